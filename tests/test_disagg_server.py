"""`kvflow serve --prefill-replicas 1 --decode-replicas 1` on the test session's Ray cluster: the same OpenAI
API, streaming, abort on disconnect, /health and /metrics with each worker's role, and Mooncake's early
rejection as 503 with Retry-After."""
import re

import httpx
import pytest

from tests.server_process import Server, wait_replicas_idle
from tests.test_web import browser  # noqa: F401 (the headless Chromium fixture)

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def server(tiny_model_dir, ray_address, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("disagg"), "--model", tiny_model_dir("llama_gqa"), "--dtype", "float32",
               "--prefill-replicas", "1", "--decode-replicas", "1", "--kv-transfer", "layerwise",
               "--replica-cpus", "1", "--ray-address", ray_address, "--num-kv-blocks", "24", "--early-rejection")
    yield s
    s.stop()


def worker_metrics(server) -> dict[tuple[str, str, str], float]:
    out = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        m = re.match(r'(kvflow:replica_\w+)\{.*replica="(\d+)",role="(\w+)".*\} (\S+)', line)
        if m:
            out[m.group(1, 2, 3)] = float(m.group(4))
    return out


def test_health_and_metrics_name_each_workers_role(server):
    h = httpx.get(f"{server.url}/health").json()
    assert [(r["index"], r["role"]) for r in h["replicas"]] == [(0, "prefill"), (1, "decode")]
    m = worker_metrics(server)
    assert m[("kvflow:replica_healthy", "0", "prefill")] == 1 and m[("kvflow:replica_healthy", "1", "decode")] == 1


def test_completions_stream_across_the_handoff(server):
    client = server.client()
    body = dict(model=client.models.list().data[0].id, max_tokens=24, temperature=0)
    prompt = "Prefill here, decode there: the stream must not notice the move"
    text = client.completions.create(prompt=prompt, **body).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **body))
    assert streamed == text and text
    m = server.metrics()
    assert m["kvflow:pd_handoffs"] >= 2 and m["kvflow:pd_transfer_fallbacks"] == 0
    wait_replicas_idle(server)


def test_a_client_that_goes_away_frees_its_blocks_on_both_workers(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", json=dict(
            prompt="a long story " * 10, max_tokens=150, stream=True, ignore_eos=True), timeout=30) as r:
        for i, line in enumerate(r.iter_lines()):
            if line.startswith("data:") and i > 6:      # a few tokens in: it is on the decode worker
                break
    wait_replicas_idle(server)


def test_early_rejection_is_a_503_with_retry_after(server):
    # two prompts of 250 tokens in one request: 16 of the decode worker's 24 blocks each before any output, so
    # the second cannot fit beside the first and the whole request is refused (the first is aborted)
    prompt = [10 + i % 300 for i in range(250)]
    body = dict(prompt=[prompt, prompt[::-1]], max_tokens=100, ignore_eos=True, temperature=0)
    before = server.metrics()
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert "no KV memory" in err["message"] and err["type"] == "ServiceUnavailableError"
    after = server.metrics()
    assert after["kvflow:pd_rejected_requests"] == before["kvflow:pd_rejected_requests"] + 1
    ok = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": prompt}, timeout=60)
    assert ok.status_code == 200, "one of them fits"
    wait_replicas_idle(server)


def test_the_dashboard_shows_each_workers_role(server, browser):
    """In the browser: the dashboard's worker table has a role column, and the router box the handoffs."""
    from tests.test_web import replicas_dashboard
    with replicas_dashboard(browser, server.url, 2) as page:
        table = page.locator("#replicas").inner_text()
        assert "Role" in table and "prefill" in table and "decode" in table
        assert "handed from prefill to decode (layerwise KV transfer)" in page.locator("#router-summary").inner_text()
