"""Server hardening (issue 19): odd input never gives a 500 nor leaks a queue slot, the API key guards
the tokenizer endpoints, what clients probe (models.retrieve, /health as JSON), the body-size limit,
long prompts refused by their size, SSE keep-alives, refusing early what would wait too long (503), and
the drain deadline's last events.

Most tests run the app in this process (uvicorn on a thread, an AsyncLLM on the tiny model, one
sequence at a time and a queue of 2), so that they can look inside the engine: its output processor
must hold nothing after the refusals. The drain test runs a real `kvflow serve`.
"""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from kvflow.sampling.params import SamplingParams
from tests.server_process import Server, free_port

pytestmark = pytest.mark.server

KEY = "hardening-key"
TINY = "tiny-llama"
MAX_BODY = 64 * 1024


class InProcessServer:
    """build_app + uvicorn on a background thread's event loop, over a real AsyncLLM (and core process)."""

    def __init__(self, model_dir: str, max_num_seqs: int = 1, max_queue_len: int = 2, engine_kw: dict | None = None,
                 **app_kw):
        import uvicorn

        from kvflow.config import EngineConfig
        from kvflow.engine.async_llm import AsyncLLM
        from kvflow.entrypoints.api_server import build_app
        from kvflow.entrypoints.metrics import ServerMetrics
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def main():
            self.engine = AsyncLLM(EngineConfig.from_kwargs(model=model_dir, max_num_seqs=max_num_seqs,
                                                            **(engine_kw or {})),
                                   max_queue_len=max_queue_len)
            metrics = ServerMetrics(TINY)
            self.engine.on_output, self.engine.on_stats = metrics.record_output, metrics.record_stats
            await self.engine.start()
            app = build_app(self.engine, TINY, metrics, KEY, **app_kw)
            self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
            task = asyncio.create_task(self.server.serve())
            while not self.server.started:
                await asyncio.sleep(0.05)
            ready.set()
            try:
                await task
            finally:
                await self.engine.shutdown()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert ready.wait(120), "in-process server did not start"

    def call(self, fn, *args):
        """fn(*args) on the server's event loop (the engine is not thread-safe)."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def held(self) -> tuple[int, int, int]:
        """Requests the engine holds: output processor parents and children, and open streams."""
        e = self.engine
        return self.call(lambda: (len(e.output_processor.parents), len(e.output_processor.children), len(e.streams)))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def app_server(tiny_model_dir):
    srv = InProcessServer(tiny_model_dir("llama_gqa"), max_body_bytes=MAX_BODY, keepalive_s=0.1, max_wait_s=3600)
    yield srv
    srv.stop()


def post(srv, path: str, body, key: str | None = KEY, http: httpx.Client | None = None, **kw) -> httpx.Response:
    """POST `body` as JSON escaped to ASCII (so that lone surrogates travel as \\ud800, as JSON allows); on
    `http`'s connection when given (a new client per request costs tens of milliseconds: its TLS context)."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (http or httpx).post(f"{srv.url}{path}", content=data, headers=headers, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, words: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == status and err["type"] and words in err["message"] + (err["param"] or ""), err
    return err


# ---- item 2: no 500 and no leaked queue slot on odd input -------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
ODD = [
    (C, {"prompt": "x", "seed": 2 ** 64}, "seed"),
    (C, {"prompt": "x", "seed": -2 ** 63 - 1}, "seed"),
    (C, {"prompt": "x", "seed": 2 ** 64 - 1, "n": 2}, "seed"),
    (C, {"prompt": "x", "seed": 2 ** 63 - 1, "n": 2}, "seed"),          # seed + 1 for the second sample
    (C, {"prompt": "x", "top_k": 2 ** 64}, "top_k"),
    (C, {"prompt": "x", "stop_token_ids": [5, 2 ** 64]}, "stop_token_ids"),
    (C, {"prompt": "x", "min_tokens": 2 ** 64, "max_tokens": None}, "min_tokens"),
    (C, {"prompt": "x", "logit_bias": {str(2 ** 64): 1}}, "logit_bias"),
    (C, {"prompt": [[1, 2], []]}, "prompt"),                          # the first prompt was added already
    (C, {"prompt": [2 ** 70], "echo": True}, "prompt_token_ids"),
    (C, {"prompt": "x\ud800y"}, "prompt"),
    (C, {"prompt": ["ok", "x\udfff"]}, "prompt[1]"),
    (C, {"prompt": "x", "stop": ["\ud800"]}, "stop"),
    (C, {"prompt": "x", "model": "\ud800"}, "model"),
    (C, {"prompt": "x", "unknown_field": "\ud800"}, "unknown_field"),
    (CHAT, {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages[0]"),
    ("/tokenize", {"prompt": "x\ud800"}, "prompt"),
    (C, b'{"prompt": "x\xed\xa0\x80y"}', ""),          # a surrogate encoded in the raw bytes
    (C, b'{"prompt": "x\xffy"}', ""),                     # not UTF-8 at all
    (C, b'{"prompt": "x", "junk": ' + b"[" * 20000 + b"]" * 20000 + b"}", ""),     # nested past recursion
    (C, b'{"prompt": "x", "max_tokens": -1, "junk": ' + b"[" * 900 + b"]" * 900 + b"}", "max_tokens"),
]


@pytest.mark.parametrize("path,body,words", ODD, ids=[str(i) for i in range(len(ODD))])
def test_odd_input_gets_a_400(app_server, path, body, words):
    assert_error(post(app_server, path, body), 400, words)
    assert app_server.held() == (0, 0, 0)


def test_int64_bounds_are_accepted(app_server):
    for body in ({"prompt": "x", "seed": 2 ** 63 - 1, "max_tokens": 2},
                 {"prompt": "x", "seed": -2 ** 63, "n": 2, "max_tokens": 2},
                 {"prompt": "x", "top_k": 2 ** 63 - 1, "max_tokens": 2}):
        r = post(app_server, C, body)
        assert r.status_code == 200, r.text


def test_hundreds_of_odd_requests_leave_the_queue_as_it_was(app_server):
    before = app_server.held()
    shapes = [body for path, body, _ in ODD if path == C]
    with httpx.Client() as http:
        for i in range(300):
            assert post(app_server, C, shapes[i % len(shapes)], http=http).status_code == 400
    assert app_server.held() == before == (0, 0, 0)
    # the queue holds 2 waiting beyond 1 running: a leaked slot per request would have filled it long ago
    r = post(app_server, C, {"prompt": "The quick brown fox", "max_tokens": 4, "n": 3, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_add_request_releases_everything_when_sending_fails(app_server):
    """A value only the wire refuses (a SamplingParams changed after its checks), and a send that fails
    after the first sample went out: both leave nothing registered, and the sent sample is aborted."""
    engine = app_server.engine
    params = SamplingParams(max_tokens=4)
    params.seed = 2 ** 64                                   # after validation: only msgpack can refuse it
    with pytest.raises(ValueError, match="cannot be sent"):
        app_server.call(engine.add_request, None, [5, 6, 7], params)
    assert app_server.held() == (0, 0, 0)

    client, sent, aborted = engine.client, [], []
    real_add, real_abort = client.add_request, client.abort_requests

    def flaky_add(req):
        if sent:
            raise RuntimeError("socket gone")
        sent.append(req.request_id)
        real_add(req)

    def record_abort(ids, *a):
        aborted.extend(ids)
        real_abort(ids, *a)
    client.add_request, client.abort_requests = flaky_add, record_abort
    try:
        with pytest.raises(RuntimeError, match="socket gone"):
            app_server.call(engine.add_request, None, [5, 6, 7], SamplingParams(n=2, max_tokens=4))
    finally:
        del client.add_request, client.abort_requests
    assert app_server.held() == (0, 0, 0)
    assert sent and set(sent) <= set(aborted)
    r = post(app_server, C, {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


# ---- item 6: the API key guards the tokenizer endpoints ------------------------------------------------------

def test_api_key_guards_tokenize_and_detokenize(app_server):
    for path, body in (("/tokenize", {"prompt": "hello"}), ("/detokenize", {"tokens": [5, 6]})):
        assert_error(post(app_server, path, body, key=None), 401)
        assert_error(post(app_server, path, body, key="wrong"), 401)
        assert post(app_server, path, body).status_code == 200
    for path in ("/health", "/metrics", "/version", "/openapi.json", "/docs"):
        assert httpx.get(f"{app_server.url}{path}").status_code == 200, path


# ---- item 7: models.retrieve, /health as its spec says -------------------------------------------------------

def test_models_retrieve_and_health_body(app_server):
    client = openai.OpenAI(base_url=f"{app_server.url}/v1", api_key=KEY, max_retries=0)
    model = client.models.retrieve(TINY)
    assert model.id == TINY and model.object == "model"
    assert client.models.retrieve(app_server.engine.model_path).id == TINY    # its path is a name too
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert_error(httpx.get(f"{app_server.url}/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"}), 404,
                 "does not exist")
    assert httpx.get(f"{app_server.url}/v1/models/{TINY}").status_code == 401
    health = httpx.get(f"{app_server.url}/health")
    assert health.status_code == 200 and health.headers["content-type"] == "application/json"
    assert health.json() == {"status": "ok"}
    spec = httpx.get(f"{app_server.url}/openapi.json").json()
    responses = spec["paths"]["/health"]["get"]["responses"]
    assert "application/json" in responses["200"]["content"] and "application/json" in responses["503"]["content"]
    assert "/v1/models/{model_id}" in spec["paths"]


# ---- item 5: body size, prompt size, tokenizing off the event loop -------------------------------------------

def test_body_over_the_limit_gets_413(app_server):
    big = {"prompt": "x", "max_tokens": 1, "junk": "a" * (MAX_BODY + 1)}
    assert_error(post(app_server, C, big), 413, "limit")

    def chunks():                                   # no Content-Length: counted as it is read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]
    r = httpx.post(f"{app_server.url}{C}", content=chunks(), timeout=30,
                   headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert_error(r, 413, "limit")
    assert post(app_server, C, {"prompt": "x", "max_tokens": 1, "junk": "a" * 1000}).status_code == 200


def test_over_long_prompt_refused_by_its_size(app_server):
    text = "hello " * (MAX_BODY // 7)                # under the body limit, over any tokenization of 1024
    err = assert_error(post(app_server, C, {"prompt": text}), 400, "maximum context length")
    assert err["param"] == "prompt"
    assert_error(post(app_server, CHAT, {"messages": [{"role": "user", "content": text}]}), 400,
                 "maximum context length")
    assert app_server.held() == (0, 0, 0)


def test_refused_by_size_before_tokenizing(app_server, monkeypatch):
    serving = app_server.server.config.app.state.serving
    tok, calls = serving.tok, []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: calls.append(len(text)) or real(text, **kw))
    too_long = "a" * (serving.max_prompt_chars + 1)
    assert len(too_long.encode()) < MAX_BODY
    assert_error(post(app_server, "/tokenize", {"prompt": too_long}), 400, "cannot fit")
    assert calls == []                               # refused without tokenizing
    r = post(app_server, "/tokenize", {"prompt": "b" * 5000})  # big enough for a worker thread
    assert r.status_code == 200 and calls == [5000]


# ---- item 3: SSE keep-alives, and refusing early what would wait too long -----------------------------------

def hold_the_batch(app_server, max_tokens: int, results: dict) -> threading.Thread:
    """Start a long request in a thread (its status lands in results["blocker"]) and wait until it holds
    the one batch slot."""
    def blocker():
        results["blocker"] = post(app_server, C, {"prompt": "x", "max_tokens": max_tokens, "ignore_eos": True,
                                                  "temperature": 0}).status_code
    t = threading.Thread(target=blocker)
    t.start()
    deadline = time.monotonic() + 10
    while app_server.held()[0] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return t


def test_queued_stream_gets_keepalives(app_server):
    """One sequence runs at a time: a stream queued behind a long request hears `: keep-alive` until its
    first token."""
    results = {}
    t = hold_the_batch(app_server, 500, results)
    lines = []
    with httpx.stream("POST", f"{app_server.url}{C}", json={"prompt": "x", "max_tokens": 2, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
    t.join(60)
    assert results["blocker"] == 200
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 1 and all(line == ": keep-alive" for line in lines[:first_data]), lines[:5]
    assert lines[-1] == "data: [DONE]"


def test_predicted_wait_over_the_limit_gets_503_at_once(app_server):
    """With max_wait_s, a request predicted to wait longer than that for a batch slot is refused at once
    (503, Retry-After) instead of queued; with no limit the same request is queued and answered."""
    serving, engine = app_server.server.config.app.state.serving, app_server.engine
    assert serving.max_wait_s == 3600                       # build_app's max_wait_s
    assert post(app_server, C, {"prompt": "x", "max_tokens": 2}).status_code == 200
    assert app_server.call(lambda: engine.service_s) > 0   # measured from the finished requests
    assert app_server.call(engine.predicted_wait, 1) == 0  # nothing runs: no wait
    results = {}
    t = hold_the_batch(app_server, 1000, results)
    try:
        assert app_server.call(engine.predicted_wait, 1) > 0
        serving.max_wait_s = 1e-6
        for stream in (False, True):
            start = time.monotonic()
            r = post(app_server, C, {"prompt": "x", "max_tokens": 2, "stream": stream})
            assert time.monotonic() - start < 2.0
            assert_error(r, 503, "would wait")
            assert int(r.headers["retry-after"]) >= 1
        assert app_server.held()[0] == 1                    # only the blocker: nothing was registered
        serving.max_wait_s = None
        r = post(app_server, C, {"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        serving.max_wait_s = 3600
        t.join(60)
    assert results["blocker"] == 200
    assert app_server.held() == (0, 0, 0)


def test_sse_keepalive_and_cut_unit():
    """sse() on its own: keep-alives while the events are slow, and at the cut an error event, [DONE],
    and the event iterator closed (which is what aborts the request)."""
    from types import SimpleNamespace

    from kvflow.entrypoints.responses import sse
    closed = []

    async def slow_events():
        try:
            await asyncio.sleep(0.35)
            yield {"n": 1}
            await asyncio.sleep(60)
            yield {"n": 2}
        finally:
            closed.append(True)

    async def run():
        serving = SimpleNamespace(keepalive_s=0.1, cut=asyncio.Event())
        body = sse(slow_events(), serving, "req-1").body_iterator
        out = []
        async for piece in body:
            out.append(piece)
            if piece.startswith("data: {\"n\""):
                asyncio.get_running_loop().call_later(0.05, serving.cut.set)
        return out

    out = asyncio.run(run())
    assert out[0] == ": keep-alive\n\n" and out.count(": keep-alive\n\n") >= 2
    data = [p for p in out if p.startswith("data:")]
    assert data[0] == 'data: {"n":1}\n\n'
    assert json.loads(data[1][6:])["error"]["code"] == 503 and data[-1] == "data: [DONE]\n\n" and len(data) == 3
    assert closed == [True]


# ---- item 4: the drain deadline ------------------------------------------------------------------------------

def test_drain_deadline_ends_streams_with_an_error_and_done(tmp_path, tiny_model_dir):
    srv = Server(tmp_path, "--model", tiny_model_dir("llama_gqa"), "--served-model-name", TINY,
                 "--max-num-seqs", "1", "--drain-timeout", "1")
    try:
        results: dict = {}

        def stream(i):
            body = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
            lines = []
            with httpx.stream("POST", f"{srv.url}{C}", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
            results[i] = lines
        def whole():
            body = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
            results["whole"] = httpx.post(f"{srv.url}{C}", json=body, timeout=60)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)] + [threading.Thread(target=whole)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while srv.metrics()["kvflow:num_requests_waiting"] < 4:       # one runs, four wait
            assert time.monotonic() < deadline
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert srv.proc.wait(30) == 0
        cut = 0
        for i in range(4):
            lines = results[i]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            last = json.loads(lines[-2][6:])
            if "error" in last:
                cut += 1
                assert last["error"]["code"] == 503 and "drain deadline" in last["error"]["message"]
            else:
                assert last["choices"][0]["finish_reason"] == "length"
        assert cut >= 1
        if results["whole"].status_code != 200:                      # a whole answer still waiting: 503
            assert_error(results["whole"], 503, "drain deadline")
            cut += 1
        log = srv.output()
        assert log.count("cut at the drain deadline") == cut, log
        assert "CancelledError" not in log and "Traceback" not in log, log
    finally:
        srv.stop()
