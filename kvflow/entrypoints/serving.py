"""What the routes share: the served model (its engine, name and metrics, reached by the routes as the
`ServingDep` dependency), the checks every request goes through (model name, context length),
submitting requests, and reading their outputs (merged, awaited whole, cancelled when the client goes
away).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from kvflow.engine.async_llm import AsyncLLM, QueueFullError
from kvflow.engine.beam_search import BeamSearchParams
from kvflow.entrypoints import protocol as P
from kvflow.entrypoints.metrics import ServerMetrics
from kvflow.entrypoints.responses import new_id
from kvflow.outputs import CompletionOutput, RequestOutput
from kvflow.sampling.params import SamplingParams

logger = logging.getLogger("kvflow")

DISCONNECT_POLL_S = 0.5
MIN_CHARS_PER_TOKEN = 8          # the character bound per token is never below this
TOKENIZE_INLINE_CHARS = 4096     # longer texts are tokenized in a worker thread, off the event loop


class ClientDisconnected(Exception):
    """The client went away before its whole answer was ready; its requests were aborted."""


class Serving:
    """One served model: its engine, its tokenizer, the names it answers to, and its metrics; how often
    a quiet stream gets a keep-alive comment, `cut`, set at the drain deadline to end every stream, and
    `max_wait_s`: a request whose predicted wait for a batch slot is longer gets 503 (None: no limit)."""

    def __init__(self, engine: AsyncLLM, model_name: str, metrics: ServerMetrics, keepalive_s: float = 15.0,
                 max_wait_s: float | None = None):
        if max_wait_s is not None and not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds or None, got {max_wait_s}")
        self.engine, self.model_name, self.metrics, self.tok = engine, model_name, metrics, engine.tokenizer
        self.model_names = {model_name, engine.model_path}
        self.keepalive_s = keepalive_s
        self.max_wait_s = max_wait_s
        self.cut = asyncio.Event()
        # a token covers at most as many characters as its longest vocabulary string: a text longer than
        # max_model_len such tokens cannot fit, and is refused before it is tokenized
        longest = max((len(t) for t in self.tok.convert_ids_to_tokens(range(self.tok.vocab_size)) if t), default=1)
        self.max_prompt_chars = engine.max_model_len * max(longest, MIN_CHARS_PER_TOKEN)

    def check_chars(self, num_chars: int, param: str = "prompt") -> None:
        if num_chars > self.max_prompt_chars:
            raise P.ProtocolError(f"this model's maximum context length is {self.engine.max_model_len} tokens, "
                                  f"and a text of {num_chars} characters cannot fit in it", param=param)

    async def _run(self, num_chars: int, fn, *args, **kw):
        """fn(*args, **kw), in a thread when the text is big enough to stall the event loop."""
        if num_chars > TOKENIZE_INLINE_CHARS:
            return await asyncio.to_thread(fn, *args, **kw)
        return fn(*args, **kw)

    async def encode(self, text: str, param: str = "prompt", **kw) -> list[int]:
        """Token ids of a prompt string, refused first if it is too long to fit in the context."""
        self.check_chars(len(text), param)
        return await self._run(len(text), self.tok.encode, text, **kw)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool,
                          tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """The rendered chat prompt (with `tools` for a template that renders them) and its token ids,
        refused first if the messages cannot fit."""
        num_chars = sum(len(m.get("content") or "") for m in messages) + len(json.dumps(tools) if tools else "")
        self.check_chars(num_chars, "messages")
        return await self._run(num_chars, self.tok.encode_chat, messages, add_generation_prompt, tools)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise P.ProtocolError(f"the model `{name}` does not exist (this server serves `{self.model_name}`)",
                                  404, "model")

    def check_length(self, num_prompt: int, max_tokens: int | None) -> None:
        limit = self.engine.max_model_len
        if num_prompt >= limit:
            raise P.ProtocolError(f"this model's maximum context length is {limit} tokens, but the prompt has "
                                  f"{num_prompt} tokens", param="prompt")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise P.ProtocolError(f"this model's maximum context length is {limit} tokens, but "
                                  f"{num_prompt + max_tokens} were requested ({num_prompt} in the prompt, "
                                  f"{max_tokens} for the completion)", param="max_tokens")

    def check_wait(self, num_seqs: int) -> None:
        """Refuse early (QueueFullError: 503 with Retry-After) work that would wait longer than max_wait_s
        for a batch slot (AsyncLLM.predicted_wait); Retry-After is the excess, at least 1 s."""
        if self.max_wait_s is None:
            return
        wait = self.engine.predicted_wait(num_seqs)
        if wait is not None and wait > self.max_wait_s:
            raise QueueFullError(f"the server is busy: this request would wait about {wait:.3g}s to start, "
                                 f"over the server's limit of {self.max_wait_s:g}s",
                                 retry_after=max(1, math.ceil(wait - self.max_wait_s)))

    async def compile_constraint(self, params, param: str | None) -> None:
        """Compile the request's output constraint on a worker thread, so that the event loop never waits on
        a compile (up to --grammar-compile-timeout-s); the engine's own check then finds it in its cache. A
        bad or too slow spec is a 400 naming `param`, the request field that set it."""
        spec = params.structured_outputs
        if spec is None:
            return
        try:
            await asyncio.to_thread(self.engine.input_processor.grammars.check, spec)
        except ValueError as e:
            raise P.ProtocolError(str(e), param=param or "structured_outputs") from None

    def submit(self, inputs: list[tuple[str | None, list[int]]], params, prefix: str, priority: int = 0,
               user: str | None = None, structured_param: str | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Add one request per (text, token ids) input, all or none; their output iterators. A bad
        request is refused (400) before a busy server refuses it (503); the engine's refusal of an output
        constraint names `structured_param`, the request field that set it."""
        for _, token_ids in inputs:
            self.check_length(len(token_ids), params.max_tokens)
        self.check_wait(len(inputs) * params.n)
        ids = []
        try:
            for text, token_ids in inputs:
                ids.append(self.engine.add_request(text, token_ids, params, new_id(prefix), priority, user))
        except ValueError as e:
            for rid in ids:
                self.engine.abort_request(rid)
            if structured_param is not None and str(e).startswith("structured_outputs"):
                raise P.ProtocolError(str(e), param=structured_param) from None
            raise
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [self.engine.outputs(rid) for rid in ids]


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]


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
    """Await `coro`, cancelling it (and so aborting its requests) if the client goes away, or with a 503
    at the drain deadline."""
    task = asyncio.ensure_future(coro)
    cut = get_serving(raw).cut
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await raw.is_disconnected():
                raise ClientDisconnected()
            if cut.is_set():
                logger.warning("%s %s: cut at the drain deadline, still running", raw.method, raw.url.path)
                raise P.ProtocolError("the server is shutting down: the drain deadline passed", 503)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def beam_search(serving: Serving, inputs: list[tuple[str | None, list[int]]], params: BeamSearchParams,
                      req) -> list[RequestOutput]:
    """Beam search of every input at once (AsyncLLM.beam_search), each as a RequestOutput whose outputs are
    its hypotheses, best first. A bad input is refused (400) before any search starts; when one search
    fails or the caller is cancelled, the others are cancelled (their beams aborted)."""
    for _, token_ids in inputs:
        serving.check_length(len(token_ids), req.max_tokens)
        serving.engine.input_processor.check(token_ids, SamplingParams(max_tokens=params.max_tokens, temperature=0))
    try:
        params.num_candidates(len(serving.engine.input_processor.eos_token_ids))
    except ValueError as e:
        raise P.ProtocolError(str(e).replace("beam_width", "n (the beam width)", 1), param="n") from None
    serving.check_wait(len(inputs) * params.beam_width)
    tasks = [asyncio.ensure_future(serving.engine.beam_search(ids, params, new_id("cmpl"), req.priority, req.user,
                                                              req.skip_special_tokens)) for _, ids in inputs]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finals = []
    for (text, ids), result in zip(inputs, results):
        outs = [CompletionOutput(j, s.text, s.output_token_ids, s.cum_logprob, None, s.finish_reason)
                for j, s in enumerate(result.sequences)]
        finals.append(RequestOutput(new_id("cmpl"), text, ids, outs, True))
    return finals
