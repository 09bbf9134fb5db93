"""Engine-core restarts (issue 19, item 1), against real `kvflow serve` processes on the tiny model: the
core is killed with SIGKILL under load, the requests in flight fail with a clear error (failed, not
replayed), /health answers 503 "restarting" then 200, the gauges reset, and new requests are served by
the new core without a restart from outside; once the restarts run out the server exits non-zero.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.server_process import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

TINY = "tiny-llama"
LONG = {"prompt": "hello world", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}


def core_pid(srv: Server) -> int | None:
    """The pid of the server's engine-core child process now (None if it has none)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == srv.proc.pid and b"kvflow.engine.core_process" in cmd:
            return int(entry)
    return None


def tiny_server(tmp_path, tiny_model_dir, *args: str) -> Server:
    return Server(tmp_path, "--model", tiny_model_dir("llama_gqa"), "--served-model-name", TINY, *args)


def stream(url: str, out: dict, key) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            out[key] = {"status": r.status_code, "events": []}
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    out[key]["events"].append(json.loads(line[6:]))
    except httpx.HTTPError as e:
        out[key] = {"status": None, "events": [], "exc": repr(e)}


def whole(url: str, out: dict, key) -> None:
    r = httpx.post(f"{url}/v1/completions", json=LONG, timeout=60)
    out[key] = {"status": r.status_code, "body": r.json()}


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_load(srv: Server, num_streams: int, num_whole: int = 0) -> tuple[dict, list[threading.Thread]]:
    results: dict = {}
    threads = [threading.Thread(target=stream, args=(srv.url, results, i)) for i in range(num_streams)]
    threads += [threading.Thread(target=whole, args=(srv.url, results, f"whole{i}")) for i in range(num_whole)]
    for t in threads:
        t.start()
    def all_in():
        m = srv.metrics()
        return m["kvflow:num_requests_running"] + m["kvflow:num_requests_waiting"] >= num_streams + num_whole
    wait_for(all_in, 20, "the requests to reach the engine")
    return results, threads


def test_core_killed_under_load_is_restarted(tmp_path, tiny_model_dir):
    srv = tiny_server(tmp_path, tiny_model_dir, "--max-num-seqs", "2")
    try:
        first = core_pid(srv)
        assert first == srv.core_pid
        results, threads = start_load(srv, 3, 1)        # two run, two wait
        os.kill(first, signal.SIGKILL)
        t0 = time.monotonic()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads) and time.monotonic() - t0 < 5
        for i in range(3):                               # every stream ends with a clear error event
            assert results[i]["status"] == 200, results[i]
            err = results[i]["events"][-1]["error"]
            assert "being restarted" in err["message"] and "not replayed" in err["message"], err
        assert results["whole0"]["status"] == 500
        assert "not replayed" in results["whole0"]["body"]["error"]["message"]

        health = httpx.get(f"{srv.url}/health")         # the first restart waits 1 s
        assert health.status_code == 503, health.text
        assert health.json()["error"]["message"].startswith("restarting")
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "restarting" in r.json()["error"]["message"]
        m = srv.metrics()                                # the dead core's gauges are gone
        assert m["kvflow:num_requests_running"] == 0 and m["kvflow:num_requests_waiting"] == 0
        assert m["kvflow:kv_cache_usage_perc"] == 0

        wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, 60, "the restarted core")
        second = core_pid(srv)
        assert second is not None and second != first
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        srv.wait_idle()                                  # nothing of the failed requests is left
        assert srv.proc.poll() is None
        assert "engine core restarted" in srv.output()
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.output()


def test_server_exits_nonzero_when_the_restarts_run_out(tmp_path, tiny_model_dir):
    srv = tiny_server(tmp_path, tiny_model_dir, "--max-engine-restarts", "1")
    try:
        pid = core_pid(srv)
        os.kill(pid, signal.SIGKILL)                     # the one restart allowed (after 1 s)
        wait_for(lambda: core_pid(srv) not in (None, pid) and
                 httpx.get(f"{srv.url}/health").status_code == 200, 60, "a restart")
        results, threads = start_load(srv, 1)
        os.kill(core_pid(srv), signal.SIGKILL)           # the second death within the window: give up
        for t in threads:
            t.join(10)
        assert "cannot be restarted" in results[0]["events"][-1]["error"]["message"]
        assert srv.proc.wait(30) != 0
        assert "cannot be restarted" in srv.output()
    finally:
        srv.stop()


def test_server_exits_nonzero_when_the_core_fails_while_loading(tmp_path, tiny_model_dir):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama_gqa"), model)
    srv = Server(tmp_path, "--model", str(model), "--served-model-name", TINY)
    try:
        for f in model.glob("*.safetensors"):          # the next core cannot load the weights
            f.write_bytes(b"not a safetensors file")
        os.kill(srv.core_pid, signal.SIGKILL)
        assert srv.proc.wait(60) != 0
        assert "could not be restarted" in srv.output()
    finally:
        srv.stop()
