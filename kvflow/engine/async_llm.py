"""AsyncLLM: the server's engine, built from an input processor, an output processor (both on this
process's asyncio loop) and an engine-core client whose core runs in its own process
(kvflow.engine.core_process, reached over ZMQ with msgpack).

`generate()` is an async iterator of cumulative RequestOutputs. Closing it early (the client went
away) aborts the request in the core, so its blocks are freed within a step.

If the core process dies (it exits, is killed, or sends "dead"), every request in flight fails at once
with EngineDeadError (failed, not replayed), its output-processor entry is released and the stats reset
to zero; then a new core is started, after a backoff of 1 s, 2 s, 4 s... While it starts, `restarting`
is true and new requests get EngineRestartingError. At most `max_engine_restarts` restarts are made
within `restart_window_s`; past that, or if the new core fails while loading, the engine gives up:
`fatal` says why and `wait_fatal()` returns (the server then exits non-zero).

`predicted_wait(n)` estimates how long a new request would wait for a batch slot, from the mean time a
finished request held its slots (`service_s`); the server refuses early with it (serving.py, max_wait_s).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from kvflow.config import EngineConfig
from kvflow.engine.beam_search import BeamSearchOutput, BeamSearchParams
from kvflow.engine.core_client import EngineDeadError, EngineRestartingError, make_client
from kvflow.engine.input_processor import InputProcessor, open_model
from kvflow.engine.output_processor import OutputProcessor
from kvflow.engine.wire import EngineStats
from kvflow.outputs import RequestOutput
from kvflow.sampling.params import SamplingParams

logger = logging.getLogger("kvflow")

DEATH_POLL_S = 0.2
RESTART_WINDOW_S = 600.0      # restarts older than this no longer count against max_engine_restarts
RESTART_BACKOFF_S = 1.0       # the first restart waits this long, each further one in the window twice as long
SERVICE_EMA = 0.2             # the weight of the newest finished request in `service_s`, a moving mean

__all__ = ["AsyncLLM", "EngineDeadError", "EngineRestartingError", "QueueFullError"]


class QueueFullError(RuntimeError):
    """Too many requests are waiting, or they would wait too long: try again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


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
                 on_stats: Callable[[EngineStats], None] | None = None, max_engine_restarts: int = 3,
                 restart_window_s: float = RESTART_WINDOW_S, restart_backoff_s: float = RESTART_BACKOFF_S):
        if max_engine_restarts < 0:
            raise ValueError(f"max_engine_restarts must be >= 0, got {max_engine_restarts}")
        self.config = config
        self.max_engine_restarts = max_engine_restarts
        self.restart_window_s, self.restart_backoff_s = restart_window_s, restart_backoff_s
        self.restarting = False           # the core died and a new one is starting
        self.fatal: str | None = None     # why the engine gave up (no more restarts)
        self.num_restarts = 0
        self._restart_times: deque[float] = deque()
        self._fatal_event: asyncio.Event | None = None
        self._start_timeout = 600.0
        self.max_queue_len = max_queue_len
        self.on_output, self.on_stats = on_output, on_stats
        self.streams: dict[str, _Stream] = {}
        self.beam_streams: dict = {}     # engine-core request id -> its beam search's BeamStream (beam_search_async)
        self.stats = EngineStats()
        # the mean time a finished request held its batch slots (first scheduled to finished), a moving
        # mean; None until a request has finished
        self.service_s: float | None = None
        self.errored: str | None = None
        self._tasks: list[asyncio.Task] = []
        self.resolved, _, self.tokenizer = open_model(config)   # the core process reads the weights itself
        rc = self.resolved
        self.model_path, self.model_config, self.max_model_len = rc.model_path, rc.arch, rc.max_model_len
        self.input_processor = InputProcessor(rc, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_replicas = (config.disagg.prefill_replicas + config.disagg.decode_replicas if config.disagg.enabled
                             else config.cluster.replicas)
        self.client = make_client(rc)

    @property
    def proc(self):
        return getattr(self.client, "proc", None)

    @property
    def location(self) -> str:
        """Where the engine runs, in words (the server's start line)."""
        if self.proc is not None:
            return f"engine core pid {self.proc.pid}"
        return f"{self.num_replicas} {'workers' if self.config.disagg.enabled else 'replicas'} on Ray"

    def attach(self, app, metrics) -> list:
        """What this kind of engine adds to the server built on it: routes on `app`, collectors on `metrics`;
        returns coroutines the server runs beside it (none here)."""
        return []

    @property
    def replica_stats(self) -> list[dict]:
        """One dict per replica (its health, pid, cores, requests routed to it and its EngineStats) when the
        engine runs replicas as Ray actors; empty for the single engine-core process."""
        stats = getattr(self.client, "replica_stats", None)
        return stats() if stats is not None else []

    @property
    def router_stats(self) -> dict | None:
        """The router's decisions, their mean cost, resumes and migrations (many replicas only)."""
        stats = getattr(self.client, "router_stats", None)
        return stats() if stats is not None else None

    async def start(self, timeout: float = 600.0) -> None:
        """Wait until the engine core has loaded the model, then start serving its outputs."""
        self._start_timeout = timeout
        self._fatal_event = asyncio.Event()
        await self.client.wait_ready(timeout)
        self._tasks = [asyncio.create_task(self._supervise())]

    async def wait_fatal(self) -> str:
        """Return (why) once the engine has given up: its core died and cannot be restarted."""
        await self._fatal_event.wait()
        return self.fatal

    async def shutdown(self, timeout: float = 60.0) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.restarting:             # a core still loading reads no message: nothing to persist yet
            await asyncio.to_thread(self.client.kill)
        await asyncio.to_thread(self.client.shutdown, timeout)
        self._fail_all(EngineDeadError("the server is shutting down"))

    @property
    def is_healthy(self) -> bool:
        return self.errored is None and self.client.is_alive

    # ---- requests ----------------------------------------------------------------------------------------

    def check_admission(self, num_seqs: int) -> None:
        """Refuse new work while the core restarts or is gone (EngineRestartingError, EngineDeadError), or when
        `num_seqs` more sequences would overflow the waiting queue (QueueFullError)."""
        if self.restarting:
            raise EngineRestartingError(f"the engine core is restarting after it failed ({self.errored})")
        if self.errored is not None:
            raise EngineDeadError(self.errored)
        if self._num_waiting(num_seqs) > self.max_queue_len:
            raise QueueFullError(f"the server is busy: {self.max_queue_len} requests are already waiting")

    def add_request(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, priority: int = 0, user: str | None = None) -> str:
        """Validate and submit a request; returns its id. Raises ValueError for a bad request,
        QueueFullError when the waiting queue is full, EngineDeadError if the core is gone. The caller
        must then consume `outputs(request_id)` (or `abort_request` it)."""
        self.check_admission(params.n)
        request_id = request_id or uuid.uuid4().hex
        reqs = self.input_processor.process(request_id, prompt_token_ids, params, time.monotonic(), priority, user)
        self.output_processor.add_request(request_id, prompt, reqs)
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
                       request_id: str | None = None, priority: int = 0,
                       user: str | None = None) -> AsyncIterator[RequestOutput]:
        async for out in self.outputs(self.add_request(prompt, prompt_token_ids, params, request_id, priority, user)):
            yield out

    async def beam_search(self, prompt_token_ids: list[int], params: BeamSearchParams,
                          request_id: str | None = None, priority: int = 0, user: str | None = None,
                          skip_special_tokens: bool = True) -> BeamSearchOutput:
        """Beam search of one prompt: its beams are requests of the core, driven from this loop as their
        outputs arrive (kvflow/engine/beam_search_async.py). Cancelling it aborts every beam."""
        from kvflow.engine.beam_search_async import beam_search
        return await beam_search(self, prompt_token_ids, params, request_id, priority, user, skip_special_tokens)

    def _end_beams(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.beam_streams.pop(rid, None)
        if request_ids and self.errored is None:
            self.client.abort_requests(request_ids)

    def abort_request(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        child_ids = self.output_processor.abort(request_id)
        if self.errored is None:
            self.client.abort_requests(child_ids)

    def predicted_wait(self, num_seqs: int = 1) -> float | None:
        """Seconds a new request of `num_seqs` samples would wait until its last sample gets a batch slot,
        predicted: the sequences ahead of it beyond the batch's `max_num_seqs` slots, times `service_s`,
        over `max_num_seqs` (slots free at max_num_seqs per service_s). Rough: it ignores how far the
        running requests have gone and the KV cache. None until a request has finished (no measure)."""
        if self.service_s is None:
            return None
        return max(0, self._num_waiting(num_seqs)) * self.service_s / self._capacity

    def _num_waiting(self, num_seqs: int) -> int:
        """Sequences that would wait for a batch slot once `num_seqs` more are added (negative: free slots)."""
        return len(self.output_processor.children) + len(self.beam_streams) + num_seqs - self._capacity

    @property
    def _capacity(self) -> int:
        """Batch slots of the whole engine: max_num_seqs on every replica."""
        return self.config.scheduler.max_num_seqs * self.num_replicas

    def _measure(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is None or m.finished_time is None:
            return
        start = m.first_scheduled_time if m.first_scheduled_time is not None else m.arrival_time
        took = max(0.0, m.finished_time - start)
        self.service_s = took if self.service_s is None else (1 - SERVICE_EMA) * self.service_s + SERVICE_EMA * took

    def reset_prefix_cache(self) -> None:
        self.client.reset_prefix_cache()

    # ---- background tasks: serve the core's messages, restart it when it dies --------------------------------

    async def _supervise(self) -> None:
        while True:
            reason = await self._serve_core()
            if not await self._restart(reason):
                return

    async def _serve_core(self) -> str:
        """Run the output loop and the process watch until the core dies; why it died."""
        tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watch_process())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        task = done.pop()
        if task.exception() is not None:
            logger.error("engine output loop failed", exc_info=task.exception())
            return f"the engine output loop failed: {task.exception()!r}"
        return task.result()

    async def _restart(self, reason: str) -> bool:
        """Fail every request in flight, then start a new core after a backoff. False if the engine gave up."""
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.restart_window_s:
            self._restart_times.popleft()
        recent = len(self._restart_times)
        give_up = recent >= self.max_engine_restarts
        logger.error("%s", reason)
        self.errored, self.restarting = reason, not give_up
        self._release_all(EngineDeadError(
            f"{reason}; the engine core {'cannot be restarted' if give_up else 'is being restarted'}: "
            "this request was failed, not replayed"))
        await asyncio.to_thread(self.client.kill)
        if give_up:
            self._give_up(f"{reason}; no restart left ({self.max_engine_restarts} allowed within "
                          f"{self.restart_window_s:.0f}s)")
            return False
        self._restart_times.append(now)
        delay = self.restart_backoff_s * 2 ** recent
        logger.warning("restarting the engine core in %.1fs (restart %d of %d allowed within %.0fs)", delay,
                       recent + 1, self.max_engine_restarts, self.restart_window_s)
        self.client.close()
        await asyncio.sleep(delay)
        self.client = make_client(self.resolved)
        try:
            await self.client.wait_ready(self._start_timeout)
        except EngineDeadError as e:
            self._give_up(f"{reason}; the engine core could not be restarted: {e}")
            return False
        self.num_restarts += 1
        self.errored, self.restarting = None, False
        logger.warning("engine core restarted%s", f": pid {self.proc.pid}" if self.proc is not None else "")
        return True

    def _release_all(self, error: BaseException) -> None:
        """Fail every stream, forget every request (no queue slot stays taken), zero the stats."""
        self._fail_all(error)
        for request_id in list(self.output_processor.parents):
            self.output_processor.abort(request_id)
        self.stats = EngineStats()
        if self.on_stats is not None:
            self.on_stats(self.stats)

    def _give_up(self, reason: str) -> None:
        logger.error("the engine gave up: %s", reason)
        self.errored, self.restarting, self.fatal = reason, False, reason
        self._fail_all(EngineDeadError(reason))
        if self._fatal_event is not None:
            self._fatal_event.set()

    async def _output_loop(self) -> str:
        while True:
            msg = await self.client.get_message()
            kind = msg[0]
            if kind == "outputs":
                outputs = msg[1]
                if self.beam_streams:          # a beam search's requests go to its driver, raw
                    outputs = []
                    for out in msg[1]:
                        beam = self.beam_streams.get(out.request_id)
                        if beam is None:
                            outputs.append(out)
                        else:
                            beam.put(out)
                results, stopped = self.output_processor.process(outputs, time.monotonic())
                self.client.stop_requests(stopped)
                for out in results:
                    stream = self.streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                    if out.finished:
                        self._measure(out)
                        if self.on_output is not None:
                            self.on_output(out)
                self.stats = msg[2]
                if self.on_stats is not None:
                    self.on_stats(self.stats)
            elif kind == "error":            # the core refused a request the frontend accepted: ["error", id,
                rid = msg[1]                 # why] or, to be retried later (503), ["error", id, why, retry_after]
                error = QueueFullError(msg[2], msg[3]) if len(msg) > 3 else RuntimeError(msg[2])
                if rid in self.beam_streams:
                    self.beam_streams[rid].fail(error)
                    continue
                child = self.output_processor.children.get(rid)      # one of its n samples: the request ends
                parent_id = child.parent.request_id if child is not None else rid
                siblings = [cid for cid in self.output_processor.abort(parent_id) if cid != rid]
                if siblings:
                    self.client.abort_requests(siblings)
                stream = self.streams.get(parent_id)
                if stream is not None:
                    stream.fail(error)
            elif kind == "dead":
                logger.error("engine core failed: %s", msg[1])
                return f"engine core failed: {msg[1].splitlines()[0]}"

    async def _watch_process(self) -> str:
        while self.client.is_alive:
            await asyncio.sleep(DEATH_POLL_S)
        return self.client.death_reason()

    def _fail_all(self, error: BaseException) -> None:
        for stream in self.streams.values():
            stream.fail(error)
        for beam in self.beam_streams.values():
            beam.fail(error)


def open_engine(config: EngineConfig, max_queue_len: int = 256, max_engine_restarts: int = 3) -> AsyncLLM:
    """The server's engine for `config`, its core starting: an AsyncLLM, or with `serverless` its replicas on
    Ray Serve, scaled with load (kvflow/serverless). `kvflow serve` opens it before importing the HTTP
    server's modules, which then load while the core loads the model."""
    engine_cls = AsyncLLM
    if config.serverless.serverless:
        from kvflow.serverless.launch import ServerlessLLM as engine_cls
    return engine_cls(config, max_queue_len, max_engine_restarts=max_engine_restarts)
