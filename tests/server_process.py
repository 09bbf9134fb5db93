"""A real `kvflow serve` process for the tests: on 127.0.0.1, a free port, stopped by its pids."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m kvflow serve ...` on a free port; `stop()` ends it (SIGTERM, then SIGKILL) and its
    engine core (SIGKILL, in case the server could not stop it)."""

    def __init__(self, tmp_path, *args: str, api_key: str | None = None, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = tmp_path / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        if api_key is not None:
            args = (*args, "--api-key", api_key)
        self.proc = subprocess.Popen([sys.executable, "-m", "kvflow", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.2)
        found = re.search(r"engine core pid (\d+)", self.output())   # none with replicas on Ray (their
        self.core_pid = int(found.group(1)) if found else None         # actors end with the server)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", self.api_key or "none"),
                             max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[re.sub(r"\{.*\}", "", name)] = float(value)
        return out

    def wait_idle(self, timeout: float = 5.0) -> dict[str, float]:
        """Wait until no request runs or waits and no KV block is held; returns the metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["kvflow:num_requests_running"] == 0 and m["kvflow:num_requests_waiting"] == 0 \
                    and m["kvflow:kv_cache_usage_perc"] == 0:
                return m
            assert time.monotonic() < deadline, f"server not idle: {m}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.kill(self.core_pid, signal.SIGKILL)   # never leave the engine core behind
        except (AttributeError, ProcessLookupError, TypeError):
            pass
        self.log.close()


def replica_metrics(server) -> dict[tuple[str, str], float]:
    """(metric, replica index) -> value of the per-replica gauges (many replicas, or prefill/decode workers)."""
    out = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        m = re.match(r'(kvflow:replica_\w+)\{.*replica="(\d+)".*\} (\S+)', line)
        if m:
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def wait_replicas_idle(server, timeout=20.0):
    """Wait until no replica runs, queues or holds KV blocks; its per-replica metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = replica_metrics(server)
        busy = {k: v for k, v in m.items() if k[0] in ("kvflow:replica_num_requests_running",
                                                       "kvflow:replica_num_requests_waiting",
                                                       "kvflow:replica_kv_cache_usage_perc") and v}
        if m and not busy:
            return m
        assert time.monotonic() < deadline, f"replicas not idle: {busy}"
        time.sleep(0.1)
