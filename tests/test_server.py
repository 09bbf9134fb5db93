"""The OpenAI-compatible server, end to end: real `kvflow serve` processes on 127.0.0.1, driven by the
official `openai` client and raw HTTP; every server is stopped by its test.

What needs real text (greedy answers, stop strings, logprobs, batching invariance) and requests long
enough to catch in flight (queue bound, drain, engine death) runs on the default model; the refusals
(API key, validation, error bodies) run on a tiny random-weight model, since no model's output shows
in them.

The main server runs in float32 so that "the same greedy text as alone" is exact under any batch
composition (bf16 rounding can legitimately flip a near-tie between batch shapes).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.server_process import Server

pytestmark = pytest.mark.server

API_KEY = "test-key-123"
TINY = "tiny-llama"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "In 1492,", "Water boils at", "My favourite food is", "The quick brown fox"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    # float32 and dequantized weights: greedy text is then the same whatever else shares the batch (the
    # default, the GGUF's blocks kept, runs few rows through the int kernels and many through a dense matmul)
    srv = Server(tmp_path_factory.mktemp("server"), "--dtype", "float32", "--quantization", "none",
                 api_key=API_KEY)
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.output()


@pytest.fixture
def client(server):
    yield server.client()
    server.wait_idle()            # after every test: nothing running, every KV block free or cached


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tiny_model_dir):
    srv = Server(tmp_path_factory.mktemp("tiny_server"), "--model", tiny_model_dir("llama_gqa"),
                 "--served-model-name", TINY, api_key=API_KEY)
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.output()


@pytest.fixture
def tiny_client(tiny_server):
    yield tiny_server.client()
    tiny_server.wait_idle()


def headers(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- completions and chat --------------------------------------------------------------------------------

def test_models_health_version_tokenize(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    version = httpx.get(f"{server.url}/version").json()
    assert version["version"] and version["cpu"]["model"] is not None and "flags" in version["cpu"]
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).status_code == 401   # keyed
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}, headers=headers()).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]},
                      headers=headers()).json()["prompt"] == "Hello world"
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]},
                      headers=headers()).json()
    assert chat["count"] > tok["count"]


def test_completion_streaming_equals_whole(client):
    whole = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[0], max_tokens=16,
                                      temperature=0)
    choice = whole.choices[0]
    assert choice.text.startswith(" Paris")
    assert choice.finish_reason == "length"
    assert whole.usage.prompt_tokens == 5 and whole.usage.completion_tokens == 16 and whole.usage.total_tokens == 21
    chunks = list(client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[0], max_tokens=16,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_streaming_equals_whole(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages,
                                           max_completion_tokens=20, temperature=0)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert whole.usage.completion_tokens <= 20
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages, max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # the same prompt a second time: its full blocks come from the prefix cache, and the stream says so
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (whole.usage.prompt_tokens - 1) // 16 * 16


def test_n_seed_and_vllm_extras(client):
    kw = dict(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, n=3, seed=7,
              extra_body={"top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                          "min_tokens": 12})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]      # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1                            # but the samples differ
    assert a.usage.completion_tokens == 36 and all(c.finish_reason == "length" for c in a.choices)


def test_batch_of_prompts_and_echo(client):
    out = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[:2], max_tokens=4,
                                    temperature=0, n=2, echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith(PROMPTS[0]) and out.choices[2].text.startswith(PROMPTS[1])
    assert out.choices[0].text == out.choices[1].text                    # greedy: both samples agree
    ids = httpx.post(f"{client.base_url}".replace("/v1/", "/tokenize"), json={"prompt": PROMPTS[0]},
                     headers=headers()).json()["tokens"]
    by_ids = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=ids, max_tokens=4, temperature=0)
    assert PROMPTS[0] + by_ids.choices[0].text == out.choices[0].text


def test_stop_strings_and_stop_reason(client):
    out = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[0], max_tokens=32,
                                    temperature=0, stop=["."])
    c = out.choices[0]
    assert c.finish_reason == "stop" and "." not in c.text and c.text.startswith(" Paris")
    assert c.model_extra["stop_reason"] == "."


def test_logprobs(client):
    out = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[0], max_tokens=5,
                                    temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(value)                 # greedy picks the most likely
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)


def test_echo_with_logprobs_scores_the_prompt(server, client):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[0]}, headers=headers()).json()["tokens"]
    out = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[0], max_tokens=3,
                                    temperature=0, logprobs=1, echo=True)
    c = out.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPTS[0])
    assert len(lp.tokens) == len(ids) + 3 and "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[len(ids)] == len(PROMPTS[0])


@pytest.mark.slow
def test_concurrent_streaming_clients_get_the_same_text_as_alone(server, client):
    prompts = PROMPTS[:4]                       # each sent by four clients at once
    alone = {p: client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=p, max_tokens=24,
                                          temperature=0).choices[0].text for p in prompts}

    async def one(aclient, prompt):
        text = ""
        stream = await aclient.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt,
                                                  max_tokens=24, temperature=0, stream=True)
        async for chunk in stream:
            text += chunk.choices[0].text
        return prompt, text

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*[one(aclient, prompts[i % len(prompts)]) for i in range(16)])

    results = asyncio.run(main())
    assert len(results) == 16
    for prompt, text in results:
        assert text == alone[prompt], prompt


def test_disconnect_mid_stream_aborts_and_frees(server, client):
    before = server.metrics()["kvflow:generation_tokens_total"]
    body = {"prompt": PROMPTS[2], "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers(), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert got
    t0 = time.monotonic()
    m = server.wait_idle(timeout=5)
    assert time.monotonic() - t0 < 5
    assert m["kvflow:generation_tokens_total"] == before          # aborted: it never finished
    ok = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[0], max_tokens=2)
    assert ok.usage.completion_tokens == 2                          # and the server keeps serving


def test_disconnect_while_waiting_for_a_whole_answer(server, client):
    body = {"prompt": PROMPTS[3], "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers(), timeout=1.0)
    server.wait_idle(timeout=5)


def test_metrics_count_requests(server, client):
    before = server.metrics()
    client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=PROMPTS[4], max_tokens=3, temperature=0)
    after = server.wait_idle()
    assert after["kvflow:generation_tokens_total"] - before["kvflow:generation_tokens_total"] == 3
    assert after["kvflow:prompt_tokens_total"] > before["kvflow:prompt_tokens_total"]
    assert after["kvflow:time_to_first_token_seconds_count"] == before["kvflow:time_to_first_token_seconds_count"] + 1
    for name in ("kvflow:e2e_request_latency_seconds_sum", "kvflow:time_per_output_token_seconds_count",
                 "kvflow:prefix_cache_queries_total", "kvflow:prefix_cache_hit_rate", "kvflow:request_success_total",
                 "kvflow:num_preemptions_swapped_total", "kvflow:cow_block_copies_total",
                 "kvflow:disk_cache_hit_tokens_total"):
        assert name in after


# ---- refusals --------------------------------------------------------------------------------------------

def test_api_key_required_on_v1(tiny_server, tiny_client):
    server = tiny_server
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers("wrong"))
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="nope").models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200      # health needs no key
    assert [m.id for m in tiny_client.models.list().data] == [TINY]


C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    (C, b"{not json", 400, "not valid JSON"),
    (C, b"[1, 2]", 400, ""),
    (C, {}, 400, "prompt"),
    (C, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 10 ** 12}, 400, "maximum context length"),
    (C, {"prompt": "x", "n": 0}, 400, "n "),
    (C, {"prompt": "x", "n": 100000}, 400, "n must be"),
    (C, {"prompt": "x", "n": "two"}, 400, "n"),
    (C, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -3}, 400, "top_k"),
    (C, {"prompt": "x", "presence_penalty": 9}, 400, "presence_penalty"),
    (C, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "x", "seed": "abc"}, 400, "seed"),
    (C, {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": ""}, 400, "prompt is empty"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [5, -1]}, 400, "prompt_token_ids"),
    (C, {"prompt": [1] * 9000}, 400, "maximum context length"),
    (C, {"prompt": "hello " * 9000}, 400, "maximum context length"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "role"),
    (CHAT, {"messages": MSG, "max_completion_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    (CHAT, {"messages": MSG, "model": "nope"}, 404, "does not exist"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_a_clear_4xx(tiny_server, tiny_client, path, body, status, words):
    kw = {"content": body, "headers": {**headers(), "content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": headers()}
    r = httpx.post(f"{tiny_server.url}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] + (err.get("param") or ""), err
    assert err["code"] == status and err["type"]


def test_openai_client_raises_bad_request(tiny_client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        tiny_client.chat.completions.create(model=TINY, messages=MSG, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        tiny_client.completions.create(model="missing", prompt="x")


# ---- queue bound, drain on SIGTERM, engine death ----------------------------------------------------------

def _stream_text(url: str, body: dict, out: dict, key: str) -> None:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        out[key] = {"status": r.status_code, "events": []}
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out[key]["events"].append(json.loads(line[6:]))


@pytest.mark.slow
def test_full_queue_gets_503_then_sigterm_drains(tmp_path, default_model_path):
    srv = Server(tmp_path, "--max-num-seqs", "1", "--max-queue-len", "1", "--drain-timeout", "60")
    try:
        import threading
        body = {"prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
        results: dict = {}
        threads = [threading.Thread(target=_stream_text, args=(f"{srv.url}/v1/completions", body, results, i))
                   for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while srv.metrics()["kvflow:num_requests_waiting"] < 1:      # one runs, one waits: the queue is full
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(f"{srv.url}/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"]["message"]
        srv.proc.send_signal(signal.SIGTERM)                          # drain: both in-flight streams finish
        for t in threads:
            t.join(60)
        assert srv.proc.wait(30) == 0
        for i in range(2):
            events = results[i]["events"]
            assert results[i]["status"] == 200
            assert "choices" in events[-1], (events[-1], srv.output())
            assert events[-1]["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health")
    finally:
        srv.stop()


@pytest.mark.slow
def test_engine_death_fails_waiting_clients_at_once(tmp_path, default_model_path):
    srv = Server(tmp_path)
    try:
        import threading
        results: dict = {}
        body = {"prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
        t = threading.Thread(target=_stream_text, args=(f"{srv.url}/v1/completions", body, results, 0))
        t.start()
        deadline = time.monotonic() + 10
        while srv.metrics()["kvflow:num_requests_running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(srv.core_pid, signal.SIGKILL)
        t0 = time.monotonic()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 3
        assert "error" in results[0]["events"][-1]
        assert "not replayed" in results[0]["events"][-1]["error"]["message"]
        health = httpx.get(f"{srv.url}/health")          # a new core is starting (tests/test_engine_restart.py)
        assert health.status_code == 503 and health.json()["error"]["message"].startswith("restarting")
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
        srv.proc.send_signal(signal.SIGTERM)             # stopping while the new core loads is clean
        assert srv.proc.wait(30) == 0, srv.output()
    finally:
        srv.stop()
