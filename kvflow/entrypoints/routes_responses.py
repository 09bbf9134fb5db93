"""POST /v1/responses, the Responses API (what the OpenAI Agents SDK and newer clients call): text input
(a string, or messages with text content, after `instructions` as a system message) rendered by the
chat template, text output, streamed as the API's events or whole (responses_api.py). Nothing is
stored: GET /v1/responses/{id} is a 404 saying so, and previous_response_id is refused.
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from kvflow.entrypoints import protocol as P
from kvflow.entrypoints import protocol_responses as PR
from kvflow.entrypoints.responses import sse
from kvflow.entrypoints.responses_api import ResponseContext
from kvflow.entrypoints.serving import ServingDep, final_outputs, merge, until_disconnected

router = APIRouter()


@router.post("/responses", responses=P.STREAM_RESPONSES)
async def create_response(req: PR.ResponsesRequest, raw: Request, serving: ServingDep):
    serving.check_model(req.model)
    params = req.sampling_params()
    text, ids = await serving.encode_chat(req.template_messages(), True)
    ctx = ResponseContext(req, serving.model_name, len(ids))
    await serving.compile_constraint(params, req.structured_param)
    gens = serving.submit([(text, ids)], params, "resp", req.priority, req.user, req.structured_param)
    if req.stream:
        return sse(ctx.stream(merge(gens)), serving, ctx.id, frame=ctx.frame, done=None,
                   error_event=ctx.error_event)
    finals = await until_disconnected(raw, final_outputs(gens))
    return ctx.response(finals[0])


@router.get("/responses/{response_id}")
async def retrieve_response(response_id: str):
    raise P.ProtocolError(f"no response `{response_id}`: kvflow stores no responses", 404, "response_id")
