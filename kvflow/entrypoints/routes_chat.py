"""POST /v1/chat/completions: messages rendered by the model's chat template; streamed or whole."""
from __future__ import annotations

from fastapi import APIRouter, Request

from kvflow.entrypoints import protocol as P
from kvflow.entrypoints import tools as T
from kvflow.entrypoints.responses import ChatContext, sse
from kvflow.entrypoints.serving import ServingDep, final_outputs, merge, until_disconnected

router = APIRouter()


@router.post("/chat/completions", responses=P.STREAM_RESPONSES)
async def chat_completions(req: P.ChatCompletionRequest, raw: Request, serving: ServingDep):
    serving.check_model(req.model)
    params = req.sampling_params()
    tools, choice = req.tool_setup()
    messages, template_tools = T.render(req.template_messages(), tools, choice, serving.tok)
    text, ids = await serving.encode_chat(messages, req.add_generation_prompt, template_tools)
    ctx = ChatContext(req, serving.model_name, params.n, len(ids), serving.tok,   # before submit: nothing to leak
                      tools=tools, choice=choice)
    await serving.compile_constraint(params, req.structured_param)
    gens = serving.submit([(text, ids)], params, "chatcmpl", req.priority, req.user, req.structured_param)
    if req.stream:
        return sse(ctx.stream(merge(gens)), serving, ctx.id)
    finals = await until_disconnected(raw, final_outputs(gens))
    return ctx.response(finals[0])
