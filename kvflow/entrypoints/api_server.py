"""The OpenAI-compatible HTTP server (`kvflow serve`): FastAPI + uvicorn in front of an AsyncLLM.

Endpoints: /v1/completions, /v1/chat/completions (streamed as server-sent events ending in
`data: [DONE]`, or whole), /v1/models, /health, /metrics, /tokenize, /detokenize, /version.
Every refusal is an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflow import __version__
from kvflow.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from kvflow.entrypoints import protocol as P
from kvflow.entrypoints.metrics import ServerMetrics
from kvflow.outputs import RequestOutput

logger = logging.getLogger("kvflow")

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5


class ClientDisconnected(Exception):
    pass


def error_response(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(P.error_body(message, status, param), status_code=status, headers=headers)


def build_app(engine: AsyncLLM, model_name: str, metrics: ServerMetrics, api_key: str | None = None) -> FastAPI:
    async def check_api_key(request: Request) -> None:
        # a dependency, not an HTTP middleware: Starlette's middleware wrapper hides client disconnects
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise P.ProtocolError("invalid or missing API key (Authorization: Bearer ...)", 401)

    app = FastAPI(title="kvflow", version=__version__)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    tok = engine.tokenizer
    model_names = {model_name, engine.model_path}

    # ---- errors ------------------------------------------------------------------------------------------

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

    def check_model(name: str | None) -> None:
        if name is not None and name not in model_names:
            raise P.ProtocolError(f"the model `{name}` does not exist (this server serves `{model_name}`)",
                                  404, "model")

    def check_length(num_prompt: int, max_tokens: int | None) -> None:
        limit = engine.max_model_len
        if num_prompt >= limit:
            raise P.ProtocolError(f"this model's maximum context length is {limit} tokens, but the prompt has "
                                  f"{num_prompt} tokens", param="prompt")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise P.ProtocolError(f"this model's maximum context length is {limit} tokens, but {num_prompt + max_tokens} "
                                  f"were requested ({num_prompt} in the prompt, {max_tokens} for the completion)",
                                  param="max_tokens")

    def submit(inputs: list[tuple[str | None, list[int]]], params, prefix: str) -> list[AsyncIterator[RequestOutput]]:
        ids = []
        try:
            for text, token_ids in inputs:
                check_length(len(token_ids), params.max_tokens)
                ids.append(engine.add_request(text, token_ids, params, P.new_id(prefix)))
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        return [engine.outputs(rid) for rid in ids]

    # ---- endpoints ---------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if engine.is_healthy:
            return Response(status_code=200)
        return error_response(f"the engine is not running: {engine.errored}", 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": P.created(),
                                            "owned_by": "kvflow", "root": engine.model_path,
                                            "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise P.ProtocolError("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            _, ids = tok.encode_chat([m.as_template_message() for m in req.messages], req.add_generation_prompt)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest):
        check_model(req.model)
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise P.ProtocolError(f"tokens must be ids in [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    @v1.post("/completions")
    async def completions(req: P.CompletionRequest, raw: Request):
        check_model(req.model)
        params = req.sampling_params()
        inputs = []
        for p in req.prompts():
            inputs.append((p, tok.encode(p)) if isinstance(p, str) else (None, list(p)))
        gens = submit(inputs, params, "cmpl")
        ctx = CompletionContext(req, model_name, params.n, inputs, tok)
        if req.stream:
            return sse(ctx.stream(merge(gens)))
        finals = await until_disconnected(raw, final_outputs(gens))
        return ctx.response(finals)

    @v1.post("/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, raw: Request):
        check_model(req.model)
        params = req.sampling_params()
        text, ids = tok.encode_chat(req.template_messages(), req.add_generation_prompt)
        gens = submit([(text, ids)], params, "chatcmpl")
        ctx = ChatContext(req, model_name, params.n, len(ids), tok)
        if req.stream:
            return sse(ctx.stream(merge(gens)))
        finals = await until_disconnected(raw, final_outputs(gens))
        return ctx.response(finals[0])

    app.include_router(v1)
    return app


# ---- streams and whole answers -----------------------------------------------------------------------------

def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
        except EngineDeadError as e:
            yield f"data: {json.dumps(P.error_body(f'the engine is not running: {e}', 500))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's index. Closing this
    iterator cancels the readers, which aborts the unfinished requests."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, gen):
        try:
            async for out in gen:
                queue.put_nowait((i, out, None))
        except Exception as e:
            queue.put_nowait((i, None, e))
        queue.put_nowait((i, None, StopAsyncIteration()))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, out, err = await queue.get()
            if isinstance(err, StopAsyncIteration):
                remaining -= 1
            elif err is not None:
                raise err
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_outputs(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(gens)
    async for i, out in merge(gens):
        finals[i] = out
    return finals


async def until_disconnected(raw: Request, coro):
    """Await `coro`, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await raw.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Context:
    """What one response has sent so far: per choice, text characters and tokens."""

    def __init__(self, req, model: str, n: int, num_choices: int, tokenizer):
        self.req, self.model, self.n, self.tok = req, model, n, tokenizer
        self.id, self.created = P.new_id(self.prefix), P.created()
        self.sent_chars = [0] * num_choices
        self.sent_tokens = [0] * num_choices
        self.done = [False] * num_choices
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def usage(self) -> dict:
        return P.usage(self.prompt_tokens, sum(self.sent_tokens), self.cached_tokens)

    def chunk(self, choices: list[dict], with_usage: bool = False) -> dict:
        c = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
             "choices": choices}
        if with_usage:
            c["usage"] = self.usage()
        return c

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[dict]:
        continuous = self.req.stream_options is not None and self.req.stream_options.continuous_usage_stats
        async for chunk in self.first_chunks():
            yield chunk
        async for i, out in outputs:
            choices = []
            for comp in out.outputs:
                k = i * self.n + comp.index
                if self.done[k]:
                    continue
                delta_text = comp.text[self.sent_chars[k]:]
                fin = P.finish_reason(comp)
                if not delta_text and fin is None:
                    continue
                choices.append(self.choice_delta(k, comp, delta_text, fin, out))
                self.sent_chars[k] = len(comp.text)
                self.sent_tokens[k] = len(comp.token_ids)
                self.done[k] = comp.finish_reason is not None
            if choices:
                yield self.chunk(choices, continuous)
        if self.req.include_usage:
            yield {**self.chunk([]), "usage": self.usage()}

    async def first_chunks(self) -> AsyncIterator[dict]:
        return
        yield


class CompletionContext(_Context):
    prefix, chunk_object = "cmpl", "text_completion"

    def __init__(self, req: P.CompletionRequest, model: str, n: int, inputs: list, tokenizer):
        super().__init__(req, model, n, n * len(inputs), tokenizer)
        self.prompt_tokens = sum(len(ids) for _, ids in inputs)
        self.echo = [(text if text is not None else tokenizer.decode(ids)) if req.echo else "" for text, ids in inputs]
        self.echoed = [False] * (n * len(inputs))

    def choice_delta(self, k: int, comp, delta_text: str, fin, out: RequestOutput | None = None) -> dict:
        echo, first = self.echo[k // self.n], self.sent_chars[k] == 0 and not self.echoed[k]
        if first and echo:
            delta_text = echo + delta_text
            self.echoed[k] = True
        lp = None
        if self.req.logprobs is not None:
            prompt = None
            if first and echo and out is not None and out.prompt_logprobs:
                prompt = (out.prompt_token_ids, out.prompt_logprobs)
            offset = self.sent_chars[k] + (len(echo) if echo and not first else 0)
            lp = P.completion_logprobs(comp, self.sent_tokens[k], offset, self.req.logprobs, self.tok, prompt)
        return {"index": k, "text": delta_text, "logprobs": lp, "finish_reason": fin,
                "stop_reason": comp.stop_reason if fin else None}

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(finals):
            for comp in out.outputs:
                k = i * self.n + comp.index
                choices.append(self.choice_delta(k, comp, comp.text, P.finish_reason(comp), out))
                self.sent_tokens[k] = len(comp.token_ids)
            self.cached_tokens += max(out.num_cached_tokens, 0)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class ChatContext(_Context):
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, req: P.ChatCompletionRequest, model: str, n: int, num_prompt_tokens: int, tokenizer):
        super().__init__(req, model, n, n, tokenizer)
        self.prompt_tokens = num_prompt_tokens
        self.top_n = (req.top_logprobs or 0) if req.logprobs else None

    async def first_chunks(self) -> AsyncIterator[dict]:
        yield self.chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None} for k in range(self.n)])

    def _logprobs(self, k: int, comp) -> dict | None:
        return None if self.top_n is None else P.chat_logprobs(comp, self.sent_tokens[k], self.top_n, self.tok)

    def choice_delta(self, k: int, comp, delta_text: str, fin, out: RequestOutput | None = None) -> dict:
        delta = {"content": delta_text} if delta_text else {}
        return {"index": k, "delta": delta, "logprobs": self._logprobs(k, comp), "finish_reason": fin,
                "stop_reason": comp.stop_reason if fin else None}

    def response(self, final: RequestOutput) -> dict:
        choices = []
        for comp in final.outputs:
            choices.append({"index": comp.index, "message": {"role": "assistant", "content": comp.text},
                            "logprobs": self._logprobs(comp.index, comp), "finish_reason": P.finish_reason(comp),
                            "stop_reason": comp.stop_reason})
            self.sent_tokens[comp.index] = len(comp.token_ids)
        self.cached_tokens = max(final.num_cached_tokens, 0)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


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
