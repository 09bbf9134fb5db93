"""How a frontend reaches its engine core: one interface, two transports.

  InprocClient   the core in this process; `step()` runs one step (LLMEngine, behind `LLM`)
  MPClient       the core in its own process (kvflow.engine.core_process), over ZMQ with msgpack
                 (kvflow.engine.wire); outputs arrive on an asyncio socket (AsyncLLM, behind the server)

ClusterClient (kvflow/cluster/client.py) is a third: many cores as Ray actors, behind a router.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod

from kvflow.config import ResolvedConfig
from kvflow.engine.wire import EngineCoreOutput, EngineCoreRequest, decode, encode
from kvflow.request import RequestStatus

logger = logging.getLogger("kvflow")


class EngineDeadError(RuntimeError):
    """The engine core process is gone: nothing more can be served by it."""


class EngineRestartingError(EngineDeadError):
    """The engine core died and a new one is starting: try again in a moment."""


class EngineCoreClient(ABC):
    @abstractmethod
    def add_request(self, req: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End requests in the core and free their blocks (unknown ids are ignored)."""

    def stop_requests(self, request_ids: list[str]) -> None:
        """End requests that a stop string finished (the output processor found it): status "stop"."""
        if request_ids:
            self.abort_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    @abstractmethod
    def reset_prefix_cache(self) -> None: ...

    @abstractmethod
    def shutdown(self) -> None: ...


class InprocClient(EngineCoreClient):
    def __init__(self, core):
        self.core = core

    def add_request(self, req: EngineCoreRequest) -> None:
        self.core.add_request(req)

    def abort_requests(self, request_ids, status=RequestStatus.FINISHED_ABORTED) -> None:
        self.core.abort_requests(request_ids, status)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        return self.core.step()

    def reset_prefix_cache(self) -> None:
        self.core.reset_prefix_cache()

    def shutdown(self) -> None:
        self.core.shutdown()


class MPClient(EngineCoreClient):
    """Starts the engine-core process, sends it requests and aborts, and receives its messages."""

    def __init__(self, rc: ResolvedConfig):
        import zmq
        import zmq.asyncio
        self._zmq_error = zmq.ZMQError
        self._closed = False
        self._dir = tempfile.TemporaryDirectory(prefix="kvflow-")
        in_addr, out_addr = (f"ipc://{self._dir.name}/{name}" for name in ("input", "output"))
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(in_addr)
        self._output = self._actx.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(out_addr)
        cmd = [sys.executable, "-m", "kvflow.engine.core_process", "--config", rc.to_json(),
               "--input", in_addr, "--output", out_addr, "--log-level", logging.getLevelName(logger.getEffectiveLevel())]
        self.proc = subprocess.Popen(cmd)
        logger.info("engine core process %d started", self.proc.pid)

    def _send(self, *msg) -> None:
        self._input.send(encode(list(msg)))

    def add_request(self, req: EngineCoreRequest) -> None:
        try:
            data = encode(["add", req])
        except (OverflowError, TypeError, ValueError) as e:   # a value msgpack cannot carry
            raise ValueError(f"the request cannot be sent to the engine core: {e}") from None
        self._input.send(data)

    def abort_requests(self, request_ids, status=RequestStatus.FINISHED_ABORTED) -> None:
        if request_ids and self.is_alive:
            self._send("abort", list(request_ids), status.value)

    def reset_prefix_cache(self) -> None:
        self._send("reset_prefix_cache")

    @property
    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def death_reason(self) -> str:
        return f"engine core process exited with code {self.proc.returncode}"

    async def wait_ready(self, timeout: float) -> dict:
        """Wait until the core has loaded the model; its "ready" info."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise EngineDeadError(f"engine core process exited with code {self.proc.returncode} while loading")
            if time.monotonic() > deadline:
                self.kill()
                raise EngineDeadError(f"engine core did not become ready within {timeout:.0f}s")
            if await self._output.poll(200):
                msg = decode(await self._output.recv())
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "dead":
                    self.proc.wait(10)
                    raise EngineDeadError(f"engine core failed to start: {msg[1]}")

    async def get_message(self) -> list:
        """The core's next message: ["outputs", [EngineCoreOutput], EngineStats] | ["error", id, message]
        | ["dead", message]."""
        return decode(await self._output.recv())

    def request_shutdown(self) -> bool:
        try:
            self._send("shutdown")
            return True
        except self._zmq_error:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Ask the core to stop (it persists its prefix cache first), kill it if it does not, close sockets."""
        if self.is_alive:
            try:
                if self.request_shutdown():
                    self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._input.close(0)
        self._output.close(0)
        self._ctx.term()
        self._actx.term()
        self._dir.cleanup()


def make_client(rc):
    """The engine-core client for this config: replicas on Ray Serve (kvflow/serverless), prefill and decode
    workers (kvflow/disagg) or replicas (kvflow/cluster) as Ray actors, or one core process."""
    if rc.config.serverless.serverless:
        from kvflow.serverless.client import ServeClient
        return ServeClient(rc)
    if rc.config.disagg.enabled:
        from kvflow.disagg.client import DisaggClient
        return DisaggClient(rc)
    if rc.config.distributed:
        from kvflow.cluster.client import ClusterClient
        return ClusterClient(rc)
    return MPClient(rc)
