"""Prefill and decode on separate workers (kvflow/disagg), 2 prefill + 1 decode workers of a tiny model on the
test session's Ray cluster: greedy outputs equal one colocated engine's in each transfer mode, layer-wise
sends leave while the forward pass goes on and are read only once every layer is in, the shared KV pool
serves a prefix the other prefill worker computed, lost transfers and a dead decode worker lose nothing,
and early rejection happens before any prefill. The block invariant is checked on every worker after every
test (conftest). The server over 1 + 1 workers: tests/test_disagg_server.py."""
import dataclasses
import os
import time

import pytest

from kvflow import LLM, SamplingParams
from kvflow.engine.async_llm import QueueFullError
from tests.conftest import random_prompts

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
LAYERS = 2                       # the tiny model's


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def single(model):
    llm = LLM(model=model, dtype="float32", block_size=16, num_kv_blocks=64, max_num_batched_tokens=64)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def pd(model, ray_address):
    # a 64-token budget: a long prompt takes several steps (the streamed modes send as it goes)
    llm = LLM(model=model, dtype="float32", block_size=16, num_kv_blocks=48, max_num_batched_tokens=64,
              prefill_replicas=2, decode_replicas=1, replica_cpus=1, router="round-robin", kv_pool=True,
              kv_transfer_timeout_s=1.0, max_replica_restarts=1)
    yield llm
    llm.shutdown()


def _mode(llm, **changes):
    """Switch the client's transfer options (the workers take any mode a request's plan names)."""
    client = llm.engine.client
    client.pd = dataclasses.replace(client.pd, **changes)
    return client


def _ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def _prompts(lengths, seed=0):
    return [{"prompt_token_ids": p} for p in random_prompts(lengths, seed=seed)]


def _totals(client):
    stats = client.transfer_stats()
    return {k: sum(s[k] for s in stats) for k in stats[0] if k != "index"}


@pytest.mark.parametrize("mode", ["sync", "async", "layerwise"])
def test_greedy_outputs_equal_one_colocated_engine(pd, single, mode):
    client = _mode(pd, kv_transfer=mode)
    prompts = _prompts([5, 17, 33, 40, 64, 150], seed=1)
    before = _totals(client)
    assert _ids(pd.generate(prompts, GREEDY)) == _ids(single.generate(prompts, GREEDY))
    after = _totals(client)
    assert after["handoffs_out"] - before["handoffs_out"] == len(prompts)
    blocks = sum(len(p["prompt_token_ids"]) // 16 for p in prompts)
    if mode == "sync":
        assert client.router_stats()["disagg"]["pull_bytes"] > 0
    else:                        # every full block reached the decode worker, and it waited for them
        assert after["blocks_received"] - before["blocks_received"] == blocks
        assert after["handoffs_in"] - before["handoffs_in"] == len(prompts)
        assert after["timeouts"] == before["timeouts"]


def test_sync_transfer_over_mooncakes_transfer_engine(pd, single):
    from kvflow.disagg.transport import mooncake_available
    if not mooncake_available():
        if os.environ.get("CI") == "true":
            pytest.fail("mooncake-transfer-engine-non-cuda (and Debian's libibverbs1) must be installed in CI")
        pytest.skip("Mooncake's transfer engine is not installed")
    client = _mode(pd, kv_transfer="sync", kv_transport="mooncake")
    try:
        prompts = _prompts([40, 90, 130], seed=10)
        stats = client.router_stats()["disagg"]
        assert _ids(pd.generate(prompts, GREEDY)) == _ids(single.generate(prompts, GREEDY))
        after = client.router_stats()["disagg"]
        assert after["pull_bytes"] - stats["pull_bytes"] == sum(len(p["prompt_token_ids"]) // 16 for p in prompts) \
            * client.block_bytes, "every full block was read from the prefill worker's memory"
        assert after["fallbacks"] == stats["fallbacks"]
    finally:
        _mode(pd, kv_transport="ray")


def test_n_samples_are_prefilled_and_decoded_like_one_engine(pd, single):
    _mode(pd, kv_transfer="async")
    n2 = SamplingParams(max_tokens=10, temperature=0, n=2, ignore_eos=True)
    prompts = _prompts([20, 45], seed=2)
    assert _ids(pd.generate(prompts, n2)) == _ids(single.generate(prompts, n2))


def test_layerwise_sends_each_layer_during_the_forward_and_decode_reads_it_whole(pd):
    client = _mode(pd, kv_transfer="layerwise")
    pd.generate(_prompts([200], seed=3), GREEDY)
    logs = client._ray.get([r.actor.transfer_log.remote() for r in client.replicas])
    sender = [e for log in logs[:2] for e in [log["sender"]] if any(x[0] == "queued" for x in e)][-1]
    # layer 0's slice leaves before the last layer of the same forward pass has run
    overlapped = 0
    for i, event in enumerate(sender):
        if event[0] == "queued" and event[3] == 0:
            rest = sender[i + 1:]
            nxt = next((e for e in rest if e[0] == "layer"), None)
            assert nxt == ("layer", 1), "layer 0's KV left before layer 1 was computed"
            overlapped += 1
    assert overlapped >= 3, "a 200-token prompt in 64-token chunks streams in several steps"
    receiver = logs[2]["receiver"]
    assembled = [e for e in receiver if e[0] == "assembled"]
    assert assembled and all(e[3] == list(range(LAYERS)) for e in assembled), "read only with every layer in"
    rid = assembled[-1][1]
    events = [e for e in receiver if e[1] == rid]
    assert events[-1] == ("added", rid), "the request is added after its last blocks were imported"
    assert sum(e[2] for e in events if e[0] == "imported") == 200 // 16


def test_the_pool_serves_a_prefix_computed_by_the_other_prefill_worker(pd, single):
    client = _mode(pd, kv_transfer="sync")
    system = random_prompts([96], seed=4)[0]
    a, b = [{"prompt_token_ids": system + tail} for tail in random_prompts([7, 9], seed=5)]
    ref = _ids(single.generate([a, b], GREEDY))
    before = client.transfer_stats()
    out = _ids(pd.generate([a], GREEDY)) + _ids(pd.generate([b], GREEDY))
    assert out == ref
    after = client.transfer_stats()
    served = [r for _, _, r in list(client.routes)[-2:]]
    assert served[0] != served[1] and set(served) <= {0, 1}, "round-robin: a and b on different prefill workers"
    hits = after[served[1]]["pool_hit_blocks"] - before[served[1]]["pool_hit_blocks"]
    assert hits == 96 // 16, "b's worker read the shared prefix from the pool instead of computing it"
    assert client.pool_stats()["hit_blocks"] >= 96 // 16


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_lost_transfer_is_computed_on_the_decode_worker(pd, single, mode):
    client = _mode(pd, kv_transfer=mode)
    prompts = _prompts([40, 70], seed=6)
    for r in client.replicas[:2]:
        client._ray.get(r.actor.set_transfer_failure.remote(True))
    try:
        before = _totals(client)
        assert _ids(pd.generate(prompts, GREEDY)) == _ids(single.generate(prompts, GREEDY))
        after = _totals(client)
    finally:
        for r in client.replicas[:2]:
            client._ray.get(r.actor.set_transfer_failure.remote(False))
    assert after["blocks_received"] == before["blocks_received"]
    if mode == "async":
        assert after["timeouts"] - before["timeouts"] == len(prompts), "waited kv_transfer_timeout_s, then computed"


def test_early_rejection_refuses_before_any_prefill(pd):
    client = _mode(pd, early_rejection=True)
    engine = pd.engine
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    a, b, c = random_prompts([300, 300, 300], seed=7)
    try:
        engine.add_request("early-a", None, a, params)       # about 20 blocks each of the decode worker's 48
        engine.add_request("early-b", None, b, params)
        with pytest.raises(QueueFullError, match="no KV memory") as e:
            engine.add_request("early-c", None, c, params)
        assert e.value.retry_after >= 1
        assert client.router_stats()["disagg"]["rejected"] == 1
        assert "early-c" not in client.requests and "early-c" not in [rid for _, rid, _ in client.routes], \
            "refused before any worker saw it"
        done = set()
        while engine.has_unfinished_requests():
            done |= {o.request_id for o in engine.step() if o.finished}
        assert done == {"early-a", "early-b"}
        assert client.needed_blocks == 0, "what admitted requests reserved is given back"
        engine.add_request("early-c", None, c, params)       # now it fits
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        _mode(pd, early_rejection=False)


def test_a_dead_decode_worker_loses_no_request(pd, single):
    client = _mode(pd, kv_transfer="sync")
    prompts = _prompts([12, 30, 50, 20, 44, 9], seed=9)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine, ids, finals, finished = pd.engine, [], {}, {}
    for i, p in enumerate(prompts):
        ids.append(f"d{i}-{time.monotonic_ns()}")
        engine.add_request(ids[-1], None, p["prompt_token_ids"], params)
    killed = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
                finished[out.request_id] = finished.get(out.request_id, 0) + 1
        decode = client.replicas[2]
        if not killed and len(decode.assigned) >= 3:
            client._ray.kill(decode.actor, no_restart=False)
            killed = True
    assert killed
    assert finished == {rid: 1 for rid in ids}, "every request answered once"
    assert _ids([finals[rid] for rid in ids]) == _ids(single.generate(prompts, params))
    assert client.router_stats()["resumed"] >= 3
    deadline = time.monotonic() + 60
    while not client.replicas[2].healthy:            # Ray restarts it; the client takes it back
        assert time.monotonic() < deadline, "the decode worker did not come back"
        client._collect(client._wait(list(client.pending), 0.5))


def test_elastic_roles_switch_a_prefill_worker_to_decode_when_decodes_pile_up(pd, single):
    client = _mode(pd, pd_elastic=True, kv_transfer="async")
    prompts = _prompts([300, 310], seed=11)                # ~25 of the decode worker's 48 blocks each
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    try:
        assert _ids(pd.generate(prompts, params)) == _ids(single.generate(prompts, params))
        switches = client.router_stats()["disagg"]["switches"]
        assert switches and switches[0]["old"] == "prefill" and switches[0]["new"] == "decode"
        assert "KV" in switches[0]["why"]
        assert client.roles.count("decode") == 2 and client.roles.count("prefill") == 1
    finally:
        _mode(pd, pd_elastic=False, kv_transfer="sync")
        client.roles[:] = ["prefill", "prefill", "decode"]
        client.switches.clear()
