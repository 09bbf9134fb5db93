"""`kvflow serve --replicas 2` on the test session's Ray cluster: one OpenAI API over two replicas, with
streaming, abort on disconnect, per-replica /health and /metrics, and a replica killed mid-stream."""
import os
import signal
import time

import httpx
import pytest

from tests.server_process import Server, replica_metrics, wait_replicas_idle
from tests.test_web import browser  # noqa: F401 (the headless Chromium fixture)

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def server(tiny_model_dir, ray_address, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("cluster"), "--model", tiny_model_dir("llama_gqa"), "--dtype", "float32",
               "--replicas", "2", "--replica-cpus", "1", "--router", "cache-aware", "--ray-address", ray_address,
               "--max-replica-restarts", "2")
    yield s
    s.stop()


def test_health_and_metrics_name_every_replica(server):
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and [r["index"] for r in h["replicas"]] == [0, 1]
    assert all(r["healthy"] for r in h["replicas"])
    assert len({r["pid"] for r in h["replicas"]}) == 2
    m = replica_metrics(server)
    assert m[("kvflow:replica_healthy", "0")] == 1 and m[("kvflow:replica_healthy", "1")] == 1


def test_completions_and_streams_over_two_replicas(server):
    client = server.client()
    body = dict(model=client.models.list().data[0].id, max_tokens=12, temperature=0)
    texts = [client.completions.create(prompt=f"Tenant {i} says hello to the cluster", **body).choices[0].text
             for i in range(4)]
    again = client.completions.create(prompt="Tenant 2 says hello to the cluster", **body).choices[0].text
    assert again == texts[2]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        prompt="Tenant 3 says hello to the cluster", stream=True, **body))
    assert streamed == texts[3]
    m = server.metrics()
    assert m["kvflow:router_decisions"] >= 6
    assert 0 < m["kvflow:router_seconds"] / m["kvflow:router_decisions"] < 1e-3, "under 1 ms per decision"
    wait_replicas_idle(server)


def test_a_client_that_goes_away_frees_its_blocks_on_its_replica(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", json=dict(
            prompt="a long story " * 10, max_tokens=500, stream=True, ignore_eos=True), timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    wait_replicas_idle(server)


def test_a_replica_killed_mid_stream_is_not_seen_by_the_client(server):
    client = server.client()
    body = dict(model=client.models.list().data[0].id, max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
    prompt = "The replica that serves this stream will die while it streams"
    want = client.completions.create(prompt=prompt, **body).choices[0].text
    victim = None
    text = []
    for i, chunk in enumerate(client.completions.create(prompt=prompt, stream=True, **body)):
        text.append(chunk.choices[0].text)
        if i == 5:          # the replica serving it is the one with a request assigned
            m = replica_metrics(server)
            busy = [idx for (name, idx), v in m.items() if name == "kvflow:replica_num_requests_assigned" and v]
            assert len(busy) == 1
            pids = {str(r["index"]): r["pid"] for r in httpx.get(f"{server.url}/health").json()["replicas"]}
            victim = pids[busy[0]]
            os.kill(victim, signal.SIGKILL)
    assert victim is not None
    assert "".join(text) == want, "resumed on the other replica where it was: no error, nothing repeated"
    deadline = time.monotonic() + 120
    while True:                                   # Ray restarts it; the router takes it back
        reps = httpx.get(f"{server.url}/health").json()["replicas"]
        if all(r["healthy"] for r in reps) and victim not in {r["pid"] for r in reps}:
            break
        assert time.monotonic() < deadline, reps
        time.sleep(0.5)
    assert sum(r["restarts"] for r in reps) == 1
    wait_replicas_idle(server)


def test_the_dashboard_shows_every_replica_and_the_routers_choices(server, browser, tmp_path):
    """In the browser: the web page's dashboard lists both replicas and the router's last choices."""
    from tests.test_web import ARTIFACTS, replicas_dashboard
    client = server.client()
    model = client.models.list().data[0].id
    for i in range(3):
        client.completions.create(model=model, prompt=f"Replica dashboard {i}", max_tokens=4, temperature=0)
    stats = httpx.get(f"{server.url}/stats").json()
    assert [r["index"] for r in stats["replicas"]] == [0, 1]
    assert stats["router"]["policy"] == "cache-aware" and stats["router"]["recent"]
    with replicas_dashboard(browser, server.url, 2) as page:
        assert "cache-aware" in page.locator("#router-summary").inner_text()
        assert page.locator("#router tbody tr").count() >= 3
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-dashboard-replicas.png"), full_page=True)
