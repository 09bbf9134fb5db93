"""Many replicas on Ray (kvflow/cluster): greedy outputs as one replica gives them, routing by prefix,
migration with KV blocks, and a replica killed under load. Two replicas of a tiny model, one Ray cluster
for the session; the block invariant is checked on every replica after every test (conftest)."""
import time

import pytest

from kvflow import LLM, SamplingParams
from kvflow.cluster.router import make_router
from tests.conftest import random_prompts

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama_gqa")


@pytest.fixture(scope="module")
def single(model):
    llm = LLM(model=model, dtype="float32", block_size=16)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def cluster(model, ray_address):
    llm = LLM(model=model, dtype="float32", block_size=16, replicas=2, replica_cpus=1, max_num_seqs=8)
    yield llm
    llm.shutdown()
    llm.engine.check_blocks()        # a shut-down cluster engine still answers the after-test check


def _token_ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def _prompts(lengths, seed=0):
    return [{"prompt_token_ids": p} for p in random_prompts(lengths, seed=seed)]


def _run(llm, prompts, params=GREEDY, each_step=None):
    """Drive the engine by hand: add every prompt, step until done; `each_step(step, ids)` after each step.
    Returns {request id: final RequestOutput} and how often each id finished."""
    engine = llm.engine
    ids = []
    for i, p in enumerate(prompts):
        rid = f"r{i}-{time.monotonic_ns()}"
        engine.add_request(rid, None, p["prompt_token_ids"], params)
        ids.append(rid)
    finals, finished, step = {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
                finished[out.request_id] = finished.get(out.request_id, 0) + 1
        step += 1
        if each_step is not None:
            each_step(step, ids)
    return [finals[rid] for rid in ids], finished


def test_greedy_outputs_equal_one_replica(cluster, single):
    prompts = _prompts([5, 17, 33, 40, 9, 64, 21, 12])
    n2 = SamplingParams(max_tokens=12, temperature=0, n=2, ignore_eos=True)
    assert _token_ids(cluster.generate(prompts, GREEDY)) == _token_ids(single.generate(prompts, GREEDY))
    assert _token_ids(cluster.generate(prompts[:3], n2)) == _token_ids(single.generate(prompts[:3], n2))
    used = {index for _, _, index in cluster.engine.client.routes}
    assert used == {0, 1}, "least-load spreads a batch over both replicas"


def test_cache_aware_sends_a_shared_prefix_to_the_replica_that_holds_it(cluster):
    client = cluster.engine.client
    old = client.router
    client.router = make_router("cache-aware", 2)
    try:
        system = random_prompts([96], seed=7)[0]
        turns = random_prompts([8, 11, 5, 9, 14, 6], seed=8)
        before = {d["index"]: d["prefix_cache_hits"] for d in client.replica_stats()}
        cluster.generate([{"prompt_token_ids": system + turns[0]}], GREEDY)
        first = client.routes[-1][2]
        for t in turns[1:]:
            cluster.generate([{"prompt_token_ids": system + t}], GREEDY)
        chosen = [index for _, _, index in list(client.routes)[-len(turns):]]
        assert chosen == [first] * len(turns), chosen
        after = {d["index"]: d["prefix_cache_hits"] for d in client.replica_stats()}
        assert after[first] - before[first] >= 5 * 96, "the shared system prompt was a prefix hit each time"
    finally:
        client.router = old


def test_migration_mid_generation_keeps_the_greedy_output(cluster, single):
    prompts = _prompts([40, 70, 23], seed=3)
    want = _token_ids(single.generate(prompts, GREEDY))
    client = cluster.engine.client
    moved = []

    def migrate(step, ids):
        if step == 4:
            for rid in ids:
                t = client.requests.get(rid)
                if t is not None and client.migrate(rid, 1 - t.replica):
                    moved.append(rid)
    hits_before = sum(d["prefix_cache_hits"] for d in client.replica_stats())
    migrations_before = client.num_migrations
    outs, finished = _run(cluster, prompts, each_step=migrate)
    assert moved, "no request could be moved"
    assert client.num_migrations - migrations_before == len(moved)
    assert _token_ids(outs) == want
    assert all(n == 1 for n in finished.values())
    hits = sum(d["prefix_cache_hits"] for d in client.replica_stats()) - hits_before
    assert hits >= 16 * len(moved), "the moved KV blocks were found on the destination, not computed again"


def test_a_replica_killed_under_load_loses_no_request(cluster, single, ray_address):
    import ray
    prompts = _prompts([30, 45, 12, 60, 25, 38, 50, 17], seed=5)
    want = _token_ids(single.generate(prompts, GREEDY))
    client = cluster.engine.client
    victim = client.replicas[0]
    resumed_before, restarts_before = client.num_resumed, victim.restarts

    def kill(step, ids):
        if step == 3:
            assert victim.assigned, "the victim holds requests when it dies"
            ray.kill(victim.actor, no_restart=False)
    outs, finished = _run(cluster, prompts, each_step=kill)
    assert _token_ids(outs) == want, "resumed requests continue exactly where they were"
    assert sorted(finished.values()) == [1] * len(prompts), "every request finished exactly once"
    assert client.num_resumed > resumed_before
    deadline = time.monotonic() + 120
    while victim.restarts == restarts_before and time.monotonic() < deadline:
        client._collect(client._wait(list(client.pending), 0.5))
    assert victim.healthy and victim.restarts == restarts_before + 1, "Ray restarted it and the router took it back"
    outs = cluster.generate(prompts, GREEDY)
    assert _token_ids(outs) == want
    assert {index for _, _, index in list(client.routes)[-len(prompts):]} == {0, 1}


def test_replica_options_are_checked():
    from kvflow.config import EngineConfig
    for bad, field in ((dict(replicas=0), "replicas"), (dict(router="random"), "router"),
                       (dict(replica_cpus=0), "replica_cpus"), (dict(replica_gpus=-1), "replica_gpus"),
                       (dict(migration_threshold=-1), "migration_threshold")):
        with pytest.raises(ValueError, match=field):
            EngineConfig.from_kwargs(**bad)


def test_rebalancing_moves_requests_from_the_busiest_replica(cluster, single):
    """All requests routed to replica 0, a threshold of 2: requests move to replica 1 with their KV blocks,
    and every output is still the greedy one."""
    from kvflow.cluster.router import Router

    class Always0(Router):
        def route(self, req, loads):
            return 0
    prompts = _prompts([33, 48, 20, 65, 41, 29], seed=11)
    want = _token_ids(single.generate(prompts, GREEDY))
    client = cluster.engine.client
    old_router, old_threshold = client.router, client.opts.migration_threshold
    client.router, client.opts.migration_threshold = Always0(2), 2
    before = client.num_migrations
    try:
        outs, finished = _run(cluster, prompts)
    finally:
        client.router, client.opts.migration_threshold = old_router, old_threshold
    assert client.num_migrations - before >= 2
    assert _token_ids(outs) == want
    assert sorted(finished.values()) == [1] * len(prompts)
