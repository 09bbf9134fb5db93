"""The OpenAI-compatible response bodies, built from RequestOutputs: whole answers, stream chunks as
server-sent events, usage, logprobs objects, and error bodies.

A response context (CompletionContext, ChatContext) remembers what one response has sent so far, so
that each stream chunk carries only the text and logprobs since the previous one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from kvflow.engine.async_llm import EngineDeadError
from kvflow.entrypoints import protocol as P
from kvflow.entrypoints.tool_parser import ToolCallParser, ToolCallStreamer, final_view
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger("kvflow")

# ---- errors ----------------------------------------------------------------------------------------------


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            413: "RequestTooLargeError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote text that is not valid UTF-8."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return _AsciiJSONResponse(error_body(message, status, param), status_code=status, headers=headers)


# ---- pieces of a body ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def created() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def finish_reason(comp: CompletionOutput) -> str | None:
    return None if comp.finish_reason == "abort" else comp.finish_reason


def _token_text(lp: Logprob | None, tokenizer, tid: int) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([tid])


def completion_logprobs(comp: CompletionOutput, start: int, text_offset: int, top_n: int, tokenizer,
                        prompt: tuple[list[int], list] | None = None) -> dict:
    """The completions API's logprobs object for comp's tokens [start:], after the prompt's tokens and
    their prompt logprobs when `prompt` is given (echo)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pairs = list(zip(comp.token_ids[start:], (comp.logprobs or [])[start:]))
    if prompt is not None:
        pairs = list(zip(*prompt)) + pairs
    for tid, entries in pairs:
        if entries is None:                  # the first prompt token: nothing before it to score it
            text = tokenizer.decode([tid])
            tokens.append(text), token_lps.append(None), tops.append(None), offsets.append(text_offset)
            text_offset += len(text)
            continue
        lp = entries.get(tid)
        text = _token_text(lp, tokenizer, tid)
        tokens.append(text)
        token_lps.append(lp.logprob if lp is not None else None)
        ranked = sorted(entries.items(), key=lambda kv: kv[1].rank or 0)
        tops.append({_token_text(v, tokenizer, k): v.logprob for k, v in ranked if k == tid or (v.rank or 0) <= top_n}
                    if top_n else None)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(comp: CompletionOutput, start: int, top_n: int, tokenizer) -> dict:
    """The chat API's logprobs object ({"content": [...]}) for comp's tokens [start:]."""
    content = []
    for tid, entries in zip(comp.token_ids[start:], (comp.logprobs or [])[start:]):
        lp = entries.get(tid)
        text = _token_text(lp, tokenizer, tid)
        top = sorted(((k, v) for k, v in entries.items() if v.rank is not None and v.rank <= top_n),
                     key=lambda kv: kv[1].rank)
        content.append({"token": text, "logprob": lp.logprob if lp is not None else None,
                        "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := _token_text(v, tokenizer, k)), "logprob": v.logprob,
                                          "bytes": list(t.encode())} for k, v in top]})
    return {"content": content}


# ---- streams ---------------------------------------------------------------------------------------------

def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


KEEPALIVE = ": keep-alive\n\n"


def sse(events: AsyncIterator[dict], serving=None, request_id: str = "", frame=_event, done: str | None = "[DONE]",
        error_event=error_body) -> StreamingResponse:
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`. With a `serving` (serving.py),
    a `: keep-alive` comment goes out whenever nothing was sent for `serving.keepalive_s` seconds (a
    queued request stays visibly alive), and when `serving.cut` is set (the drain deadline) the stream
    ends with an error event. If the engine fails, an error event comes before [DONE]. The Responses API
    passes its own `frame` (event lines), `error_event(message, status)`, and no `done`."""
    done = f"data: {done}\n\n" if done else ""

    async def body():
        keepalive = getattr(serving, "keepalive_s", None) or None
        cut = asyncio.ensure_future(serving.cut.wait()) if serving is not None else None
        it, nxt = events.__aiter__(), None
        try:
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                while not nxt.done():
                    await asyncio.wait([t for t in (nxt, cut) if t is not None], timeout=keepalive,
                                       return_when=asyncio.FIRST_COMPLETED)
                    if cut is not None and cut.done() and not nxt.done():
                        logger.warning("request %s: cut at the drain deadline, still streaming", request_id)
                        yield frame(error_event("the server is shutting down: the drain deadline passed", 503))
                        if done:
                            yield done
                        return
                    if not nxt.done():
                        yield KEEPALIVE
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    break
                yield frame(event)
        except EngineDeadError as e:
            yield frame(error_event(f"the engine is not running: {e}", 500))
        except (ValueError, RuntimeError) as e:      # the core refused the request after accepting it
            logger.warning("request %s failed: %s", request_id, e)
            yield frame(error_event(str(e), 500))
        finally:
            for t in (nxt, cut):
                if t is not None and not t.done():
                    t.cancel()          # cancelling the pending read aborts the request
        if done:
            yield done
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Context:
    """What one response has sent so far: per choice, text characters and tokens."""

    def __init__(self, req, model: str, n: int, num_choices: int, tokenizer):
        self.req, self.model, self.n, self.tok = req, model, n, tokenizer
        self.id, self.created = new_id(self.prefix), created()
        self.sent_chars = [0] * num_choices
        self.sent_tokens = [0] * num_choices
        self.done = [False] * num_choices
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(self.sent_tokens), self.cached_tokens)

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
        cached: dict[int, int] = {}             # per prompt: its prefix-cache hit (final usage)
        async for i, out in outputs:
            cached[i] = max(out.num_cached_tokens, 0)
            self.cached_tokens = sum(cached.values())
            choices = []
            for comp in out.outputs:
                k = i * self.n + comp.index
                if self.done[k]:
                    continue
                delta_text = comp.text[self.sent_chars[k]:]
                fin = finish_reason(comp)
                if not delta_text and fin is None:
                    continue
                choice = self.choice_delta(k, comp, delta_text, fin, out)
                if choice is None:            # nothing to send yet (text held back): its tokens go later
                    continue
                choices.append(choice)
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
            lp = completion_logprobs(comp, self.sent_tokens[k], offset, self.req.logprobs, self.tok, prompt)
        return {"index": k, "text": delta_text, "logprobs": lp, "finish_reason": fin,
                "stop_reason": comp.stop_reason if fin else None}

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(finals):
            for comp in out.outputs:
                k = i * self.n + comp.index
                choices.append(self.choice_delta(k, comp, comp.text, finish_reason(comp), out))
                self.sent_tokens[k] = len(comp.token_ids)
            self.cached_tokens += max(out.num_cached_tokens, 0)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}


class ChatContext(_Context):
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, req: P.ChatCompletionRequest, model: str, n: int, num_prompt_tokens: int, tokenizer,
                 tools=(), choice=None):
        super().__init__(req, model, n, n, tokenizer)
        self.prompt_tokens = num_prompt_tokens
        self.top_n = (req.top_logprobs or 0) if req.logprobs else None
        # tool calls are read from the output unless tool_choice is none (tool_parser.py)
        self.tool_mode = choice.mode if choice is not None and tools and choice.mode != "none" else None
        self.parsers = [ToolCallParser(self.tool_mode, {t.name for t in tools}, choice.name)
                        for _ in range(n)] if self.tool_mode else []
        self.streamers = [ToolCallStreamer(p) for p in self.parsers]

    def tool_finish(self, fin: str | None, called: bool) -> str | None:
        """OpenAI's finish_reason for a choice that called tools: "tool_calls" (auto, required), except
        "stop" for a named function (as OpenAI answers); a cut-short output keeps "length"."""
        if not called or fin != "stop" or self.tool_mode == "named":
            return fin
        return "tool_calls"

    async def first_chunks(self) -> AsyncIterator[dict]:
        yield self.chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None} for k in range(self.n)])

    def _logprobs(self, k: int, comp) -> dict | None:
        return None if self.top_n is None else chat_logprobs(comp, self.sent_tokens[k], self.top_n, self.tok)

    def choice_delta(self, k: int, comp, delta_text: str, fin, out: RequestOutput | None = None) -> dict | None:
        delta = {"content": delta_text} if delta_text else {}
        if self.tool_mode:
            content, calls = self.streamers[k].update(comp.text, final=fin is not None)
            delta = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = calls
            if not delta and fin is None:
                return None
            fin = self.tool_finish(fin, self.streamers[k].called)
        return {"index": k, "delta": delta, "logprobs": self._logprobs(k, comp), "finish_reason": fin,
                "stop_reason": comp.stop_reason if fin else None}

    def message(self, comp) -> tuple[dict, str | None]:
        """The whole answer's message and finish_reason, with its tool calls parsed out."""
        fin = finish_reason(comp)
        if not self.tool_mode:
            return {"role": "assistant", "content": comp.text}, fin
        view = final_view(self.parsers[comp.index], comp.text)
        if not view.calls:
            return {"role": "assistant", "content": view.content}, fin
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in view.calls]
        return {"role": "assistant", "content": view.content or None, "tool_calls": calls}, self.tool_finish(fin, True)

    def response(self, final: RequestOutput) -> dict:
        choices = []
        for comp in final.outputs:
            message, fin = self.message(comp)
            choices.append({"index": comp.index, "message": message,
                            "logprobs": self._logprobs(comp.index, comp), "finish_reason": fin,
                            "stop_reason": comp.stop_reason})
            self.sent_tokens[comp.index] = len(comp.token_ids)
        self.cached_tokens = max(final.num_cached_tokens, 0)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
