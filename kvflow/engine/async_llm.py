"""AsyncLLM: the server's engine. The Frontend (tokenizer, validation, detokenization) runs in this
process on the asyncio loop; the EngineCore runs in its own process (kvflow.engine.core_process),
reached over ZMQ with msgpack.

`generate()` is an async iterator of cumulative RequestOutputs. Closing it early (the client went
away) aborts the request in the core, so its blocks are freed within a step. If the core process
dies, every waiting request fails at once with EngineDeadError and `errored` says why.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable

import zmq
import zmq.asyncio

from kvflow.config import EngineConfig, default_model_path
from kvflow.engine.core import EngineStats
from kvflow.engine.core_process import (config_to_json, decode_outputs, decode_stats, encode_request, pack,
                                        unpack)
from kvflow.engine.frontend import Frontend
from kvflow.outputs import RequestOutput
from kvflow.sampling.params import SamplingParams

logger = logging.getLogger("kvflow")

DEATH_POLL_S = 0.2


class EngineDeadError(RuntimeError):
    """The engine core process is gone: nothing more can be served."""


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


class AsyncLLM(Frontend):
    def __init__(self, config: EngineConfig, max_queue_len: int = 256,
                 on_output: Callable[[RequestOutput], None] | None = None,
                 on_stats: Callable[[EngineStats], None] | None = None):
        self.max_queue_len = max_queue_len
        self.on_output, self.on_stats = on_output, on_stats
        self.streams: dict[str, _Stream] = {}
        self.stats = EngineStats()
        self.errored: str | None = None
        self._tasks: list[asyncio.Task] = []
        # the core process loads the weights while this one reads the tokenizer
        self._spawn(dataclasses.replace(config, model=config.model or default_model_path()))
        try:
            super().__init__(config)
        except BaseException:
            self._kill()
            self._close()
            raise
        self.reader = None                   # the core process reads the weights itself

    def _spawn(self, config: EngineConfig) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="kvflow-")
        in_addr, out_addr = (f"ipc://{self._dir.name}/{name}" for name in ("input", "output"))
        self._zmq = zmq.Context()
        self._azmq = zmq.asyncio.Context()
        self._input = self._zmq.socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(in_addr)
        self._output = self._azmq.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(out_addr)
        cmd = [sys.executable, "-m", "kvflow.engine.core_process", "--config", config_to_json(config),
               "--input", in_addr, "--output", out_addr, "--log-level", logging.getLevelName(logger.getEffectiveLevel())]
        self.proc = subprocess.Popen(cmd)
        logger.info("engine core process %d started", self.proc.pid)

    async def start(self, timeout: float = 600.0) -> None:
        """Wait until the engine core has loaded the model, then start serving its outputs."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise EngineDeadError(f"engine core process exited with code {self.proc.returncode} while loading")
            if time.monotonic() > deadline:
                self._kill()
                raise EngineDeadError(f"engine core did not become ready within {timeout:.0f}s")
            if await self._output.poll(200):
                msg = unpack(await self._output.recv())
                if msg[0] == "ready":
                    break
                if msg[0] == "dead":
                    self.proc.wait(10)
                    raise EngineDeadError(f"engine core failed to start: {msg[1]}")
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watch_process())]

    async def shutdown(self, timeout: float = 60.0) -> None:
        for t in self._tasks:
            t.cancel()
        if self.proc.poll() is None:
            try:
                self._input.send(pack(["shutdown"]), zmq.NOBLOCK)
                await asyncio.to_thread(self.proc.wait, timeout)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                self._kill()
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._close()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _close(self) -> None:
        self._input.close(0)
        self._output.close(0)
        self._zmq.term()
        self._azmq.term()
        self._dir.cleanup()

    @property
    def is_healthy(self) -> bool:
        return self.errored is None and self.proc.poll() is None

    # ---- requests ----------------------------------------------------------------------------------------

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Validate and submit a request; returns its id. Raises ValueError for a bad request,
        QueueFullError when the waiting queue is full, EngineDeadError if the core is gone. The caller
        must then consume `outputs(request_id)` (or `abort_request` it)."""
        if self.errored is not None:
            raise EngineDeadError(self.errored)
        waiting = len(self.output_processor.children) + params.n - self.config.max_num_seqs
        if waiting > self.max_queue_len:
            raise QueueFullError(f"the server is busy: {self.max_queue_len} requests are already waiting")
        request_id = request_id or uuid.uuid4().hex
        reqs = self.make_requests(request_id, prompt, prompt_token_ids, params)
        self.streams[request_id] = _Stream()
        for req in reqs:
            self._input.send(pack(["add", encode_request(req)]))
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
        child_ids = self.abort(request_id)
        if child_ids and self.is_healthy:
            self._input.send(pack(["abort", child_ids]))

    def reset_prefix_cache(self) -> None:
        self._input.send(pack(["reset_prefix_cache"]))

    # ---- background tasks --------------------------------------------------------------------------------

    async def _output_loop(self) -> None:
        while True:
            msg = unpack(await self._output.recv())
            kind = msg[0]
            if kind == "outputs":
                results, to_abort = self.process(decode_outputs(msg[1]))
                if to_abort:                 # a stop string ended these
                    self._input.send(pack(["abort", to_abort]))
                for out in results:
                    stream = self.streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                    if out.finished and self.on_output is not None:
                        self.on_output(out)
                self.stats = decode_stats(msg[2])
                if self.on_stats is not None:
                    self.on_stats(self.stats)
            elif kind == "error":            # the core refused a request the frontend accepted
                self.abort(msg[1])
                stream = self.streams.get(msg[1])
                if stream is not None:
                    stream.fail(RuntimeError(msg[2]))
            elif kind == "dead":
                logger.error("engine core failed: %s", msg[1])
                self._die(f"engine core failed: {msg[1].splitlines()[0]}")
                return

    async def _watch_process(self) -> None:
        while self.proc.poll() is None:
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
