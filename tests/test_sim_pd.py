"""Mooncake's P/D features in the simulator (kvflow/sim/pd.py): early rejection refuses what the decode
workers' KV cannot hold and admits everything when it can; the shared KV pool lets one prefill worker reuse a
prefix another computed, within its capacity, least recently used out."""
import math

import pytest

from kvflow.config import EngineConfig
from kvflow.memory.kv_cache_manager import extend_block_hashes
from kvflow.sim.cluster import simulate
from kvflow.sim.pd import EarlyRejection, KVPool
from kvflow.sim.replica import engine_spec
from kvflow.sim.report import format_table
from kvflow.sim.workload import SimRequest, parse_workload, workload_requests

from .test_sim import all_blocks_back, fixed_profile

PD = dict(prefill_replicas=2, decode_replicas=1, kv_transfer="layerwise", router="round-robin",
          pd_policy="least-load", enable_prefix_caching=True)


def run(requests, **kw):
    config = EngineConfig.from_kwargs(**{**PD, **kw})
    return simulate(config, fixed_profile(0.01, 1e-5), requests)


# ---- early rejection --------------------------------------------------------------------------------------

def burst(n=40):
    return list(workload_requests(parse_workload(f"chat:n={n},seed=3")))      # all at time 0


def answered_once(sim, rec, n):
    assert len(rec.rows) == n and not rec.records                 # one row per request, none left in flight
    assert rec.num_added == n
    if sim.admission is not None:                                 # every admitted request's need released
        assert sim.admission.needed_blocks == 0 and not sim.admission.need
    all_blocks_back(sim)


def test_early_rejection_refuses_when_decode_kv_is_short():
    sim, rec = run(burst(), early_rejection=True, num_kv_blocks=120)
    s = rec.summary(None, sim)
    refused = [row for row in rec.rows if row[7]]
    assert s["rejected"] == len(refused) > 0
    assert all("early rejection (503)" in row[7] for row in refused)
    assert s["completed"] + s["rejected"] == 40
    answered_once(sim, rec, 40)
    assert "Early rejections (503):" in format_table(s)


def test_early_rejection_admits_all_when_decode_kv_is_ample():
    sim, rec = run(burst(), early_rejection=True, num_kv_blocks=4000)
    s = rec.summary(None, sim)
    assert s["rejected"] == 0 and s["completed"] == 40
    answered_once(sim, rec, 40)
    _, plain = run(burst(), num_kv_blocks=4000)                   # nothing refused: the same run as without it
    assert rec.rows == plain.rows
    assert "rejected" not in plain.summary(None)


def test_early_rejection_rule_is_the_clients():
    er = EarlyRejection(16, None)
    predicted = er.predictor.predict(100, None, {}).mean(cap=64)
    assert 0 < predicted < 64                                      # the prior's mean, below max_tokens
    need = math.ceil((100 + predicted) / 16)
    assert er.admit("a", 100, 64, None, capacity=need) == ""       # exactly fits
    assert er.needed_blocks == need
    assert "503" in er.admit("b", 100, 64, None, capacity=need)    # no room beside "a"
    er.forget("a")
    assert er.needed_blocks == 0 and er.admit("b", 100, 64, None, capacity=need) == ""
    assert er.rejected == 1


# ---- the shared KV pool -----------------------------------------------------------------------------------

def shared_prefix(n=6, gap=1.0):
    """Requests with one 320-token prefix, far apart in time: round-robin puts them on alternate workers."""
    prefix = list(range(1000, 1320))
    return [SimRequest(i * gap, prefix + [5000 + 10 * i + k for k in range(8)], 4) for i in range(n)]


def test_pool_lets_a_second_prefill_worker_reuse_a_prefix():
    _, plain = run(shared_prefix())
    sim, rec = run(shared_prefix(), kv_pool=True)
    cached = [row[5] for row in rec.rows]
    plain_cached = [row[5] for row in plain.rows]
    # without the pool, the second worker computes the prefix once itself (request 1); with it, it reads it
    assert plain_cached[:2] == [0, 0] and cached[0] == 0 and cached[1] == 320
    assert sum(cached) > sum(plain_cached)
    assert rec.summary(None, sim)["prefix_cache_hit_rate"] > plain.summary(None)["prefix_cache_hit_rate"]
    assert sim.kv_pool.stats()["hit_blocks"] == 20                 # 320 tokens / 16, read once by worker 1
    all_blocks_back(sim)


def test_pool_read_is_exposed_on_the_worker():
    """The read blocks the worker's loop: its step starts after bytes / link bandwidth."""
    config = EngineConfig.from_kwargs(**PD, kv_pool=True)
    profile = fixed_profile(0.01, 0.0, link_bytes_per_s=1e6)      # a slow link: the load shows in the TTFT
    sim, rec = simulate(config, profile, shared_prefix(2, gap=20.0))     # (after the first put has landed)
    load_s = 20 * engine_spec(config, profile).block_bytes / 1e6
    _, plain = simulate(EngineConfig.from_kwargs(**PD), profile, shared_prefix(2, gap=20.0))
    assert rec.rows[1][3] == pytest.approx(plain.rows[1][3] + load_s)
    assert sim.kv_pool.stats()["load_s"] == pytest.approx(load_s)


def test_pool_put_lands_after_the_link_and_its_copy_delays_the_hand_off():
    """worker._publish: the worker's loop copies the blocks out (the hand-off, and so the first request's
    decode, waits bytes / swap bandwidth), then the fire-and-forget put crosses the link: a prefill worker
    that looks before it lands does not find them."""
    config = EngineConfig.from_kwargs(**PD, kv_pool=True)
    profile = fixed_profile(0.01, 0.0, link_bytes_per_s=1e6, swap_bytes_per_s=2e6)
    nbytes = 20 * engine_spec(config, profile).block_bytes           # the 320-token prefix's 20 blocks
    put_s, land_s = nbytes / 2e6, nbytes / 2e6 + nbytes / 1e6
    early = shared_prefix(2, gap=0.9 * land_s)
    sim, rec = simulate(config, profile, early)
    assert [row[5] for row in rec.rows] == [0, 0]                    # the second looked before the put landed
    assert sim.kv_pool.stats()["put_s"] == pytest.approx(2 * put_s)  # each worker put the prefix once
    _, plain = simulate(EngineConfig.from_kwargs(**PD), profile, early)
    e2e = 4                                                          # (rows: ..., e2e at index 4)
    assert rec.rows[0][e2e] == pytest.approx(plain.rows[0][e2e] + put_s)
    late = shared_prefix(2, gap=1.1 * land_s)
    sim, rec = simulate(config, profile, late)
    assert [row[5] for row in rec.rows] == [0, 320]                  # after it landed: read from the pool
    all_blocks_back(sim)


def test_pool_respects_its_capacity_and_evicts_the_oldest():
    config = EngineConfig.from_kwargs(**PD)
    block_bytes = engine_spec(config, fixed_profile()).block_bytes
    prompts = [[7 * i + k for k in range(64)] for i in range(6)]        # 4 blocks each, no shared prefix
    reqs = [SimRequest(i * 1.0, p, 4) for i, p in enumerate(prompts)]
    sim, rec = run(reqs, kv_pool=True, kv_pool_bytes=10 * block_bytes)
    stats = sim.kv_pool.stats()
    assert stats["capacity_blocks"] == 10 and stats["blocks"] == 10 and stats["evictions"] == 24 - 10
    newest = extend_block_hashes([], prompts[-1], 16)
    assert list(sim.kv_pool.blocks)[-4:] == newest                 # the last publisher's blocks are newest
    all_blocks_back(sim)


def test_kv_pool_lru_order():
    pool = KVPool(3)
    pool.put(pool.publish(0, [1, 2, 3]), lands_at=1.0)
    assert pool.get([1, 2, 9], 0, now=0.5) == []                    # on its way
    assert pool.get([1, 2, 9], 0, now=1.0) == [1, 2]                # the walk stops at the first gap
    pool.put(pool.publish(1, [4]), lands_at=2.0)                    # 3 is now the oldest: out
    assert pool.get([4], 0, now=2.0) == [4]
    assert list(pool.blocks) == [1, 2, 4] and pool.evictions == 1
    assert pool.get([1, 2, 4], 1) == [2, 4]                         # less the blocks the caller holds
    assert pool.publish(0, [3]) == []                               # worker 0 put 3 before: never again
    assert 3 not in pool.blocks and pool.puts == 4
    with pytest.raises(ValueError, match="kv_pool"):
        KVPool(-1)


def test_elastic_roles_switch_as_the_clients_rule_says():
    """pd_elastic: with decodes piling up on one decode worker and prompts short, a prefill worker becomes a
    decode worker (after the rule's cooldown) and TPOT drops; with long prompts and short outputs a decode
    worker becomes a prefill worker. Every request is answered once; every worker's blocks come back; the
    routers only ever see a worker in its current role."""
    from kvflow.disagg.elastic import COOLDOWN_S
    from kvflow.sim.cost_model import load_profile

    def run_pd(p, d, workload, elastic, **kw):
        config = EngineConfig.from_kwargs(prefill_replicas=p, decode_replicas=d, pd_elastic=elastic,
                                          num_kv_blocks=4000, **kw)
        return simulate(config, load_profile("h100"), workload_requests(parse_workload(workload)))

    decode_heavy = "random:n=600,rate=60,input=32,output=400,seed=1"
    _, fixed = run_pd(3, 1, decode_heavy, False, max_num_seqs=32)
    sim, rec = run_pd(3, 1, decode_heavy, True, max_num_seqs=32)
    s = rec.summary(None, sim)
    assert [(x.old, x.new) for x in sim.elastic.switches][:1] == [("prefill", "decode")]
    assert sim.elastic.switches[0].time >= COOLDOWN_S and s["role_switches"] >= 1
    assert s["completed"] == 600 and sorted(r[0] for r in rec.rows) == sorted(r[0] for r in fixed.rows)
    assert s["median_tpot_ms"] < 0.7 * fixed.summary(None)["median_tpot_ms"]
    roles = [r.role for r in sim.replicas()]
    assert sim.prefill.ready == [x == "prefill" for x in roles] and sim.decode.ready == [x == "decode" for x in roles]
    all_blocks_back(sim)
    assert "Role switches (elastic P/D)" in format_table(s)

    sim, rec = run_pd(1, 3, "random:n=600,rate=60,input=2000,output=8,seed=1", True)
    assert ("decode", "prefill") in [(x.old, x.new) for x in sim.elastic.switches]
    assert rec.summary(None, sim)["completed"] == 600
    all_blocks_back(sim)
