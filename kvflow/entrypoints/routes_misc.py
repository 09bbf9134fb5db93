"""Everything but generation: /v1/models (behind the API key), and /health, /version, /metrics,
/tokenize, /detokenize (open)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from kvflow import __version__
from kvflow.entrypoints import protocol as P
from kvflow.entrypoints.responses import created, error_response
from kvflow.entrypoints.serving import ServingDep

router = APIRouter()          # at the root, no API key
v1_router = APIRouter()       # under /v1


@router.get("/health")
async def health(serving: ServingDep):
    engine = serving.engine
    if engine.is_healthy:
        return Response(status_code=200)
    return error_response(f"the engine is not running: {engine.errored}", 503)


@router.get("/version")
async def version():
    return {"version": __version__}


@router.get("/metrics")
async def prometheus(serving: ServingDep):
    return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@v1_router.get("/models")
async def models(serving: ServingDep):
    engine = serving.engine
    return {"object": "list", "data": [{"id": serving.model_name, "object": "model", "created": created(),
                                        "owned_by": "kvflow", "root": engine.model_path,
                                        "max_model_len": engine.max_model_len}]}


@router.post("/tokenize")
async def tokenize(req: P.TokenizeRequest, serving: ServingDep):
    serving.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise P.ProtocolError("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        _, ids = serving.tok.encode_chat([m.as_template_message() for m in req.messages], req.add_generation_prompt)
    else:
        ids = serving.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": serving.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(req: P.DetokenizeRequest, serving: ServingDep):
    serving.check_model(req.model)
    vocab = serving.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise P.ProtocolError(f"tokens must be ids in [0, {vocab})", param="tokens")
    return {"prompt": serving.tok.decode(req.tokens, skip_special_tokens=False)}
