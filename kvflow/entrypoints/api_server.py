"""The OpenAI-compatible HTTP server (`kvflow serve`): FastAPI + uvicorn in front of an AsyncLLM.

Endpoints: /v1/completions (routes_completions.py), /v1/chat/completions (routes_chat.py), both
streamed as server-sent events ending in `data: [DONE]` or whole; /v1/responses (routes_responses.py,
streamed as the Responses API's events or whole); /v1/models, /v1/models/{id},
/health, /metrics, /tokenize, /detokenize, /version (routes_misc.py). The routes share a `Serving`
(serving.py); their bodies are built in responses.py. Every refusal is an OpenAI-style error body:
{"error": {"message", "type", "param", "code"}}; this module maps each exception to its status.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflow import __version__
from kvflow.engine.async_llm import AsyncLLM, EngineDeadError, EngineRestartingError, QueueFullError
from kvflow.entrypoints import protocol as P
from kvflow.entrypoints import routes_chat, routes_completions, routes_misc, routes_responses, routes_web
from kvflow.entrypoints.metrics import ServerMetrics
from kvflow.entrypoints.responses import error_response
from kvflow.entrypoints.serving import ClientDisconnected, Serving

logger = logging.getLogger("kvflow")

RETRY_AFTER_S = 1
# The largest request body read. A full 128k-token context is about 1 MB as a JSON list of token ids
# (up to 6 digits and a separator each) and less as text, so 2 MiB leaves room for any request that
# can fit in a context, while a client cannot make the server hold megabytes per request (issue 19: a
# 5 MB body was read whole).
MAX_BODY_BYTES = 2 * 1024 * 1024
KEEPALIVE_S = 15.0
DRAIN_BACKSTOP_S = 5.0


def build_app(engine: AsyncLLM, model_name: str, metrics: ServerMetrics, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, keepalive_s: float = KEEPALIVE_S,
              max_wait_s: float | None = None) -> FastAPI:
    """The app serving a started engine as `model_name`; with `api_key`, /v1, /tokenize and /detokenize
    ask for it as a Bearer token (/health, /metrics, /version and the docs stay open). Bodies over
    `max_body_bytes` get 413; a stream that has sent nothing for `keepalive_s` seconds gets an SSE
    comment (0 turns keep-alives off). With `max_wait_s`, a request predicted to wait longer than that
    for a batch slot gets 503 with Retry-After at once (Serving.check_wait; None: no limit)."""
    async def check_api_key(request: Request) -> None:
        # a dependency, not an HTTP middleware: Starlette's middleware wrapper hides client disconnects
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise P.ProtocolError("invalid or missing API key (Authorization: Bearer ...)", 401)

    app = FastAPI(title="kvflow", version=__version__, responses=P.ERROR_RESPONSES)
    app.state.serving = Serving(engine, model_name, metrics, keepalive_s, max_wait_s)
    add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    for router in (routes_misc.v1_router, routes_completions.router, routes_chat.router, routes_responses.router):
        v1.include_router(router)
    app.include_router(routes_misc.router)
    app.include_router(routes_misc.keyed_router, dependencies=[Depends(check_api_key)])
    app.include_router(routes_web.router)        # the web page (GET /, /ui/*) and its GET /stats, keyed
    app.include_router(routes_web.keyed_router, dependencies=[Depends(check_api_key)])
    app.include_router(v1)
    return app


class BodySizeLimit:
    """A plain ASGI middleware (it leaves disconnects visible): 413 for a body over `max_bytes`, from its
    Content-Length before reading anything, or as soon as a chunked body passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(self._too_large(), 413)(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._too_large())
            return message
        return await self.app(scope, counting_receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a route can raise, as its HTTP status and an OpenAI-style error body."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
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
        return error_response(str(exc), 503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ClientDisconnected)
    async def _gone(_, exc: ClientDisconnected):
        return Response(status_code=499)      # nobody reads it: the request was aborted

    @app.exception_handler(EngineRestartingError)
    async def _restarting(_, exc: EngineRestartingError):
        return error_response(str(exc), 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(EngineDeadError)
    async def _dead(_, exc: EngineDeadError):
        return error_response(f"the engine is not running: {exc}", 500)


# ---- kvflow serve ---------------------------------------------------------------------------------------

async def serve(engine: AsyncLLM, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                served_model_name: str | None = None, drain_timeout: float = 30.0, log_level: str = "warning",
                max_body_bytes: int = MAX_BODY_BYTES, keepalive_s: float = KEEPALIVE_S,
                max_wait_s: float | None = None) -> int:
    """Serve `engine` (open_engine's, its core already loading) until SIGTERM/SIGINT (exit code 0), or until
    the engine core dies and cannot be restarted (its `max_engine_restarts` within AsyncLLM's window, or it
    fails while loading): exit code 1. See build_app for the other settings."""
    import uvicorn
    name = served_model_name or os.path.basename(engine.model_path.rstrip("/")).removesuffix(".gguf")
    metrics = ServerMetrics(name)
    engine.on_output, engine.on_stats = metrics.record_output, metrics.record_stats
    await engine.start()
    app = build_app(engine, name, metrics, api_key, max_body_bytes, keepalive_s, max_wait_s)
    background = engine.attach(app, metrics)      # what a kind of engine adds to the server (routes, tasks)
    # the drain deadline is ours (cut_at_deadline): streams still running then end with an error event and
    # [DONE]; uvicorn's own cancellation is only a backstop a little later
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                          timeout_graceful_shutdown=drain_timeout + DRAIN_BACKSTOP_S))
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler it found: make that a
    # no-op so that the engine process is stopped below and the exit is clean.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"kvflow: serving {name} on http://{host}:{port} ({engine.location})", flush=True)
    print(f"kvflow: web page (chat playground, engine dashboard) at {routes_web.page_url(host, port)}", flush=True)
    tasks = [asyncio.create_task(cut_at_deadline(server, app.state.serving, drain_timeout)),
             asyncio.create_task(exit_when_engine_gives_up(server, engine)),
             *(asyncio.create_task(job) for job in background)]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        await engine.shutdown()
    return 0 if server.started and engine.fatal is None else 1


async def exit_when_engine_gives_up(server, engine: AsyncLLM) -> None:
    """The engine core cannot come back (every stream has failed): stop the server, so that it exits
    non-zero and a supervisor sees it."""
    reason = await engine.wait_fatal()
    print(f"kvflow: the engine core cannot be restarted, exiting: {reason}", flush=True)
    server.should_exit = True


async def cut_at_deadline(server, serving: Serving, drain_timeout: float) -> None:
    """Once the server starts draining, wait `drain_timeout` seconds, then end every stream still running."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await asyncio.sleep(drain_timeout)
    serving.cut.set()
