"""AsyncLLM: the server's engine, built from an input processor, an output processor (both on this
process's asyncio loop) and an engine-core client whose core runs in its own process
(kvflow.engine.core_process, reached over ZMQ with msgpack).

`generate()` is an async iterator of cumulative RequestOutputs. Closing it early (the client went
away) aborts the request in the core, so its blocks are freed within a step. If the core process
dies, every waiting request fails at once with EngineDeadError and `errored` says why.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from kvflow.config import EngineConfig
from kvflow.engine.core_client import EngineDeadError, MPClient
from kvflow.engine.input_processor import InputProcessor, open_model
from kvflow.engine.output_processor import OutputProcessor
from kvflow.engine.wire import EngineStats
from kvflow.outputs import RequestOutput
from kvflow.sampling.params import SamplingParams

logger = logging.getLogger("kvflow")

DEATH_POLL_S = 0.2

__all__ = ["AsyncLLM", "EngineDeadError", "QueueFullError"]


class QueueFullError(RuntimeError):
    """Too many requests are waiting: try again later."""


class _Stream:
    """One request's outputs: the latest cumulative RequestOutput (a slow reader skips to the newest)."""

    def __init__(self):
        self.output: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self.output = output
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    async def get(self) -> RequestOutput:
        await self.event.wait()
        self.event.clear()
        if self.error is not None:
            raise self.error
        out, self.output = self.output, None
        return out


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_queue_len: int = 256,
                 on_output: Callable[[RequestOutput], None] | None = None,
                 on_stats: Callable[[EngineStats], None] | None = None):
        self.config = config
        self.max_queue_len = max_queue_len
        self.on_output, self.on_stats = on_output, on_stats
        self.streams: dict[str, _Stream] = {}
        self.stats = EngineStats()
        self.errored: str | None = None
        self._tasks: list[asyncio.Task] = []
        self.resolved, _, self.tokenizer = open_model(config)   # the core process reads the weights itself
        rc = self.resolved
        self.model_path, self.model_config, self.max_model_len = rc.model_path, rc.arch, rc.max_model_len
        self.input_processor = InputProcessor(rc, set(self.tokenizer.eos_token_ids) | set(rc.arch.eos_token_ids))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.client = MPClient(rc)

    @property
    def proc(self):
        return self.client.proc

    async def start(self, timeout: float = 600.0) -> None:
        """Wait until the engine core has loaded the model, then start serving its outputs."""
        await self.client.wait_ready(timeout)
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watch_process())]

    async def shutdown(self, timeout: float = 60.0) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.to_thread(self.client.shutdown, timeout)
        self._fail_all(EngineDeadError("the server is shutting down"))

    @property
    def is_healthy(self) -> bool:
        return self.errored is None and self.client.is_alive

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Validate and submit a request; returns its id. Raises ValueError for a bad request,
        QueueFullError when the waiting queue is full, EngineDeadError if the core is gone. The caller
        must then consume `outputs(request_id)` (or `abort_request` it)."""
        if self.errored is not None:
            raise EngineDeadError(self.errored)
        waiting = len(self.output_processor.children) + params.n - self.config.scheduler.max_num_seqs
        if waiting > self.max_queue_len:
            raise QueueFullError(f"the server is busy: {self.max_queue_len} requests are already waiting")
        request_id = request_id or uuid.uuid4().hex
        arrival = time.monotonic()
        reqs = self.input_processor.process(request_id, prompt_token_ids, params, arrival)
        self.output_processor.add_request(request_id, prompt, prompt_token_ids, params, arrival,
                                          [r.request_id for r in reqs])
        self.streams[request_id] = _Stream()
        sent = 0
        try:
            for req in reqs:
                self.client.add_request(req)
                sent += 1
        except BaseException:            # release everything registered above: no leaked queue slot
            self.streams.pop(request_id, None)
            child_ids = self.output_processor.abort(request_id)
            if sent and self.errored is None:
                self.client.abort_requests(child_ids)
            raise
        return request_id

    async def outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutputs of a submitted request; the last has finished=True. Closing the
        iterator early (the client went away) aborts the request."""
        stream, finished = self.streams[request_id], False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.abort_request(request_id)

    async def generate(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        async for out in self.outputs(self.add_request(prompt, prompt_token_ids, params, request_id)):
            yield out

    def abort_request(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        child_ids = self.output_processor.abort(request_id)
        if self.errored is None:
            self.client.abort_requests(child_ids)

    def reset_prefix_cache(self) -> None:
        self.client.reset_prefix_cache()

    # ---- background tasks --------------------------------------------------------------------------------

    async def _output_loop(self) -> None:
        while True:
            msg = await self.client.get_message()
            kind = msg[0]
            if kind == "outputs":
                results, stopped = self.output_processor.process(msg[1], time.monotonic())
                self.client.stop_requests(stopped)
                for out in results:
                    stream = self.streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                    if out.finished and self.on_output is not None:
                        self.on_output(out)
                self.stats = msg[2]
                if self.on_stats is not None:
                    self.on_stats(self.stats)
            elif kind == "error":            # the core refused a request the frontend accepted
                self.output_processor.abort(msg[1])
                stream = self.streams.get(msg[1])
                if stream is not None:
                    stream.fail(RuntimeError(msg[2]))
            elif kind == "dead":
                logger.error("engine core failed: %s", msg[1])
                self._die(f"engine core failed: {msg[1].splitlines()[0]}")
                return

    async def _watch_process(self) -> None:
        while self.client.is_alive:
            await asyncio.sleep(DEATH_POLL_S)
        self._die(f"engine core process exited with code {self.proc.returncode}")

    def _die(self, reason: str) -> None:
        if self.errored is None:
            logger.error(reason)
            self.errored = reason
        self._fail_all(EngineDeadError(reason))

    def _fail_all(self, error: BaseException) -> None:
        for stream in self.streams.values():
            stream.fail(error)
