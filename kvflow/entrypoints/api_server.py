"""The OpenAI-compatible HTTP server (`kvflow serve`): FastAPI + uvicorn in front of an AsyncLLM.

Endpoints: /v1/completions (routes_completions.py), /v1/chat/completions (routes_chat.py), both
streamed as server-sent events ending in `data: [DONE]` or whole; /v1/models, /health, /metrics,
/tokenize, /detokenize, /version (routes_misc.py). The routes share a `Serving` (serving.py); their
bodies are built in responses.py. Every refusal is an OpenAI-style error body:
{"error": {"message", "type", "param", "code"}}; this module maps each exception to its status.
"""
from __future__ import annotations

import hmac
import logging
import os
import signal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflow import __version__
from kvflow.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from kvflow.entrypoints import protocol as P
from kvflow.entrypoints import routes_chat, routes_completions, routes_misc
from kvflow.entrypoints.metrics import ServerMetrics
from kvflow.entrypoints.responses import error_response
from kvflow.entrypoints.serving import ClientDisconnected, Serving

logger = logging.getLogger("kvflow")

RETRY_AFTER_S = 1


def build_app(engine: AsyncLLM, model_name: str, metrics: ServerMetrics, api_key: str | None = None) -> FastAPI:
    """The app serving a started engine as `model_name`; with `api_key`, /v1 asks for it as a Bearer token."""
    async def check_api_key(request: Request) -> None:
        # a dependency, not an HTTP middleware: Starlette's middleware wrapper hides client disconnects
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise P.ProtocolError("invalid or missing API key (Authorization: Bearer ...)", 401)

    app = FastAPI(title="kvflow", version=__version__)
    app.state.serving = Serving(engine, model_name, metrics)
    add_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    for router in (routes_misc.v1_router, routes_completions.router, routes_chat.router):
        v1.include_router(router)
    app.include_router(routes_misc.router)
    app.include_router(v1)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a route can raise, as its HTTP status and an OpenAI-style error body."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error_response(f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", 400)
        return error_response(f"{loc}: {msg}" if loc else msg, 400, loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(P.ProtocolError)
    async def _protocol(_, exc: P.ProtocolError):
        return error_response(str(exc), exc.status, exc.param)

    @app.exception_handler(ValueError)
    async def _value(_, exc: ValueError):
        return error_response(str(exc), 400)

    @app.exception_handler(QueueFullError)
    async def _busy(_, exc: QueueFullError):
        return error_response(str(exc), 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(ClientDisconnected)
    async def _gone(_, exc: ClientDisconnected):
        return Response(status_code=499)      # nobody reads it: the request was aborted

    @app.exception_handler(EngineDeadError)
    async def _dead(_, exc: EngineDeadError):
        return error_response(f"the engine is not running: {exc}", 500)


# ---- kvflow serve ---------------------------------------------------------------------------------------

async def serve(engine_config, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                served_model_name: str | None = None, max_queue_len: int = 256, drain_timeout: float = 30.0,
                log_level: str = "warning") -> int:
    import uvicorn
    engine = AsyncLLM(engine_config, max_queue_len)
    name = served_model_name or os.path.basename(engine.model_path.rstrip("/")).removesuffix(".gguf")
    metrics = ServerMetrics(name)
    engine.on_output, engine.on_stats = metrics.record_output, metrics.record_stats
    await engine.start()
    app = build_app(engine, name, metrics, api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                          timeout_graceful_shutdown=drain_timeout))
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler it found: make that a
    # no-op so that the engine process is stopped below and the exit is clean.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"kvflow: serving {name} on http://{host}:{port} (engine core pid {engine.proc.pid})", flush=True)
    try:
        await server.serve()
    finally:
        await engine.shutdown()
    return 0 if server.started else 1
