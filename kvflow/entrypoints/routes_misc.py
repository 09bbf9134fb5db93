"""Everything but generation: /v1/models and /v1/models/{id} (under /v1, behind the API key),
/tokenize and /detokenize (behind the API key: they run the tokenizer), and /health, /version,
/metrics (open)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from kvflow import __version__
from kvflow.platform import capabilities
from kvflow.entrypoints import protocol as P
from kvflow.entrypoints import tools as T
from kvflow.entrypoints.responses import created, error_response
from kvflow.entrypoints.serving import ServingDep

router = APIRouter()          # at the root, no API key
keyed_router = APIRouter()    # at the root, behind the API key
v1_router = APIRouter()       # under /v1


@router.get("/health", response_model=P.HealthResponse, response_model_exclude_none=True,
            responses={503: {"model": P.ErrorResponse}})
async def health(serving: ServingDep):
    """200 {"status": "ok"} while the engine runs; 503 with an error body while its core restarts (the
    message starts "restarting", with Retry-After) or once it is gone."""
    engine = serving.engine
    if engine.is_healthy:
        replicas = [{"index": d["index"], "healthy": d["healthy"], "pid": d["pid"], "restarts": d["restarts"],
                     "role": d.get("role", "replica"),
                     "num_assigned": d["num_assigned"]} for d in engine.replica_stats]
        return {"status": "ok", "replicas": replicas} if replicas else {"status": "ok"}
    if engine.fatal is None:          # it died: restarting (or about to, within a poll interval)
        why = f" ({engine.errored})" if engine.errored else ""
        return error_response(f"restarting: the engine core failed{why} and a new one is starting", 503,
                              headers={"Retry-After": "1"})
    return error_response(f"the engine is not running: {engine.errored}", 503)


@router.get("/version")
async def version():
    return {"version": __version__, "cpu": capabilities()}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(serving: ServingDep):
    serving.metrics.record_replicas(serving.engine.replica_stats, serving.engine.router_stats)
    return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def model_card(serving) -> dict:
    engine = serving.engine
    return {"id": serving.model_name, "object": "model", "created": created(), "owned_by": "kvflow",
            "root": engine.model_path, "max_model_len": engine.max_model_len}


@v1_router.get("/models")
async def models(serving: ServingDep):
    return {"object": "list", "data": [model_card(serving)]}


@v1_router.get("/models/{model_id:path}")
async def model(model_id: str, serving: ServingDep):
    """One model (the openai client's `models.retrieve`); 404 for a model this server does not serve."""
    serving.check_model(model_id)
    return model_card(serving)


@keyed_router.post("/tokenize")
async def tokenize(req: P.TokenizeRequest, serving: ServingDep):
    serving.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise P.ProtocolError("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        messages, _ = T.render(P.template_messages(req.messages), [], T.ToolChoice("none"), serving.tok)
        _, ids = await serving.encode_chat(messages, req.add_generation_prompt)
    else:
        ids = await serving.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": serving.engine.max_model_len}


@keyed_router.post("/detokenize")
async def detokenize(req: P.DetokenizeRequest, serving: ServingDep):
    serving.check_model(req.model)
    vocab = serving.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise P.ProtocolError(f"tokens must be ids in [0, {vocab})", param="tokens")
    return {"prompt": serving.tok.decode(req.tokens, skip_special_tokens=False)}
