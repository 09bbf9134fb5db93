"""POST /v1/completions: a prompt, a batch of prompts, or token ids; streamed or whole."""
from __future__ import annotations

from fastapi import APIRouter, Request

from kvflow.entrypoints import protocol as P
from kvflow.entrypoints.responses import CompletionContext, sse
from kvflow.entrypoints.serving import ServingDep, beam_search, final_outputs, merge, until_disconnected

router = APIRouter()


@router.post("/completions", responses=P.STREAM_RESPONSES)
async def completions(req: P.CompletionRequest, raw: Request, serving: ServingDep):
    serving.check_model(req.model)
    if req.use_beam_search:
        return await _beam_search(req, raw, serving)
    params = req.sampling_params()
    tok = serving.tok
    inputs = []
    for p in req.prompts():
        inputs.append((p, await serving.encode(p)) if isinstance(p, str) else (None, list(p)))
    await serving.compile_constraint(params, req.structured_param)
    gens = serving.submit(inputs, params, "cmpl", req.priority, req.user, req.structured_param)   # validates the token ids that echo decodes below
    ctx = CompletionContext(req, serving.model_name, params.n, inputs, tok)
    if req.stream:
        return sse(ctx.stream(merge(gens)), serving, ctx.id)
    finals = await until_disconnected(raw, final_outputs(gens))
    return ctx.response(finals)


async def _beam_search(req: P.CompletionRequest, raw: Request, serving):
    """use_beam_search: n beams per prompt, returned as n choices per prompt, best first; not streamed."""
    params = req.beam_search_params(serving.engine.max_model_len)
    inputs = []
    for p in req.prompts():
        inputs.append((p, await serving.encode(p)) if isinstance(p, str) else (None, list(p)))
    finals = await until_disconnected(raw, beam_search(serving, inputs, params, req))
    return CompletionContext(req, serving.model_name, params.beam_width, inputs, serving.tok).response(finals)
