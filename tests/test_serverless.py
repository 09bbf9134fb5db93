"""`kvflow serve --serverless` on the test session's Ray cluster, with Ray Serve's own autoscaler: scale to zero
after idle and back on the next request; the warm pool used first and refilled; the prefix cache kept across
a scale to zero; a burst scaled up to two replicas and back down without a lost request; a replica killed
mid-request; a request that waits too long for a replica gets 503 with Retry-After; the block invariant on
every replica. The default model (SmolLM2-135M GGUF); short idle and look-back times."""
import concurrent.futures
import os
import signal
import time

import httpx
import pytest

from tests.server_process import Server

pytestmark = [pytest.mark.slow, pytest.mark.server]

IDLE_S = 2.0
CHAT = [{"role": "system", "content": "You are a terse assistant that answers questions about geography and "
                                      "history in one short sentence, without any preamble or follow-up."},
        {"role": "user", "content": "Which river flows through the city of Paris, and into which sea does it flow?"}]


def start(tmp_path_factory, ray_address, *args):
    return Server(tmp_path_factory.mktemp("serverless"), "--serverless", "--ray-address", ray_address,
                  "--replica-cpus", "1", "--num-kv-blocks", "256", "--max-model-len", "1024", *args, timeout=180)


def stop(server):
    app = None
    try:
        app = httpx.get(f"{server.url}/v1/serverless", timeout=10).json()["app"]
    except Exception:
        pass
    server.stop()
    if app is not None:                        # the server deletes its app when it stops; if it could not:
        from ray import serve
        if app in serve.status().applications:
            serve.delete(app)


@pytest.fixture(scope="module")
def server(default_model_path, ray_address, tmp_path_factory):
    s = start(tmp_path_factory, ray_address, "--preset", "deepflow", "--min-replicas", "0", "--max-replicas", "2",
              "--scale-down-idle-s", str(IDLE_S), "--warm-pool", "2", "--target-ongoing-requests", "1")
    yield s
    stop(s)


def stats(server) -> dict:
    return httpx.get(f"{server.url}/v1/serverless", timeout=30).json()


def wait_for(server, pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        s = stats(server)
        if pred(s):
            return s
        assert time.monotonic() < deadline, f"{what}: {s}"
        time.sleep(0.25)


def model(server) -> str:
    return httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]


def chat(server, messages, max_tokens=16):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                   json={"model": model(server), "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()


def check_blocks(server):
    for replica, res in httpx.get(f"{server.url}/v1/serverless/blocks", timeout=60).json().items():
        if res.get("gone"):                    # a killed worker whose replica Serve is replacing
            continue
        assert res["ok"], (replica, res)
        assert res["requests"] == 0 and res["blocks_in_use"] == 0, (replica, res)


def test_scale_to_zero_and_back_keeps_the_prefix_and_uses_the_warm_pool(server):
    s = stats(server)
    assert s["replicas"] == 0 and s["pool"]["ready"] == 2, s         # min 0: nothing runs before traffic
    first = chat(server, CHAT)
    answer = first["choices"][0]["message"]["content"]
    assert answer and first["usage"]["completion_tokens"] > 0
    check_blocks(server)
    s = wait_for(server, lambda s: s["replicas"] == 0, 30, "no scale to zero")
    assert (s["starts"]["cold"], s["starts"]["warm"]) == (0, 1) and s["ttft_waited_warm"]["count"] == 1, s
    assert s["keeper"]["blocks"] > 0, s                              # its prefix cache went to host memory
    s = wait_for(server, lambda s: s["pool"]["ready"] == 2, 60, "the pool was not refilled")
    # the conversation returns after the scale to zero: the same answer (greedy; a prefix hit computes fewer
    # positions, so a near-tie late in the answer may flip: its first words must agree), and a prefix hit
    again = chat(server, CHAT)
    assert again["choices"][0]["message"]["content"].split()[:5] == answer.split()[:5], (again, answer)
    cached = again["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    assert cached >= 16 * ((again["usage"]["prompt_tokens"] - 1) // 16) - 16 and cached > 0, again["usage"]
    s = stats(server)
    assert s["starts"]["warm"] == 2 and s["pool"]["claims"] == 2 and s["keeper"]["hit_blocks"] > 0, s
    turn2 = chat(server, CHAT + [{"role": "assistant", "content": answer},
                                 {"role": "user", "content": "And how long is it?"}])
    assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached, turn2["usage"]
    check_blocks(server)


def test_a_burst_scales_up_and_back_down_without_losing_a_request(server):
    prompts = [f"Write a list of {n} fruits, one per line, with their colours." for n in range(3, 9)]

    def one(p, max_tokens=48):
        r = httpx.post(f"{server.url}/v1/completions", timeout=180,
                       json={"model": model(server), "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                             "ignore_eos": True})
        r.raise_for_status()
        return r.json()
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(one, p, 128) for p in prompts]
        s = wait_for(server, lambda s: max(n for _, n in s["timeline"]) == 2, 60, "no scale-up under the burst")
        outs = [f.result() for f in futures]
    assert all(o["usage"]["completion_tokens"] == 128 for o in outs)
    assert [r["kind"] for r in s["start_records"][-2:]] == ["warm", "warm"], s   # the pool first
    # one long request keeps a replica busy while the fleet scales down: drained, never dropped
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        long = ex.submit(one, "Count from one to one thousand in words:", 160)
        wait_for(server, lambda s: s["replicas"] <= 1, 40, "no scale-down under one request")
        assert long.result()["usage"]["completion_tokens"] == 160
    check_blocks(server)
    wait_for(server, lambda s: s["replicas"] == 0, 30, "no scale to zero after the burst")


def test_a_replica_killed_mid_request_resumes_elsewhere(server):
    client = server.client()
    stream = client.completions.create(model=model(server), prompt="Tell me a long story about a lighthouse keeper.",
                                       max_tokens=96, temperature=0, stream=True, extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True})
    text, usage, killed = [], None, False
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
        if not killed and len(text) >= 8:
            pid = stats(server)["start_records"][-1]["worker_pid"]
            os.kill(pid, signal.SIGKILL)
            killed = True
    assert killed and usage is not None and usage.completion_tokens == 96
    assert stats(server)["resumed"] >= 1
    wait_for(server, lambda s: s["replicas"] >= 1, 30, "the replica was not replaced")
    check_blocks(server)


def test_a_request_that_waits_too_long_for_a_replica_gets_503(default_model_path, ray_address, tmp_path_factory):
    s = start(tmp_path_factory, ray_address, "--max-replicas", "1", "--warm-pool", "0",
              "--scale-down-idle-s", "30", "--scale-up-timeout-s", "0.3")
    try:
        r = httpx.post(f"{s.url}/v1/completions", timeout=30, json={"model": model(s), "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        st = wait_for(s, lambda st: st["replicas"] == 1, 90, "the cold start did not finish")
        assert (st["starts"]["cold"], st["starts"]["warm"]) == (1, 0) and st["refused_scale_up_timeout"] == 1
        b = st["start_records"][0]["breakdown"]
        assert set(b) >= {"process", "imports", "kernels", "weights", "kv_alloc", "warm_up"}
        r = httpx.post(f"{s.url}/v1/completions", timeout=30, json={"model": model(s), "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        check_blocks(s)
    finally:
        stop(s)


def test_bad_autoscaling_settings_are_refused_at_start():
    from kvflow.config import EngineConfig
    with pytest.raises(ValueError, match="min_replicas"):
        EngineConfig.from_kwargs(serverless=True, min_replicas=3, max_replicas=1)
    with pytest.raises(ValueError, match="scale_down_idle_s"):
        EngineConfig.from_kwargs(serverless=True, scale_down_idle_s=-1.0)
