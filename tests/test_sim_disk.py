"""The disk tier of the prefix cache in the simulator (kvflow/sim/disk.py): the real KVCacheManager spills
evicted prefix blocks to it and the real Scheduler waits for its reads, as with the engine's DiskKVStore."""
import pytest

from kvflow.config import EngineConfig
from kvflow.sim.cluster import simulate
from kvflow.sim.disk import SimDiskTier
from kvflow.sim.replica import engine_spec
from kvflow.sim.workload import SimRequest

from .test_sim import all_blocks_back, fixed_profile

PROMPT = list(range(1000, 1320))               # 20 full blocks of 16 tokens


def workload():
    """A long prompt, then unrelated ones that push its blocks out of a 48-block cache, then the prompt again
    (with a new tail) while the replica is idle."""
    reqs = [SimRequest(0.0, PROMPT + [7], 4)]
    reqs += [SimRequest(1.0 + 0.5 * i, [5000 + 400 * i + k for k in range(320)], 4) for i in range(4)]
    return reqs + [SimRequest(10.0, PROMPT + [9, 9], 4)]


def run(**kw):
    config = EngineConfig.from_kwargs(num_kv_blocks=48, **kw)
    return simulate(config, fixed_profile(0.01), workload())


def test_disk_tier_serves_evicted_prefix_blocks_after_a_read():
    plain_sim, plain = run()
    sim, rec = run(kv_store_dir="/nonexistent/kvflow-sim", kv_store_max_bytes=1 << 30)
    s = rec.summary(None, sim)
    assert s["completed"] == 6 and s["disk_hit_tokens"] == 20 * 16
    assert plain.summary(None, plain_sim)["completed"] == 6 and "disk_hit_tokens" not in plain.summary(None, plain_sim)
    spec = engine_spec(EngineConfig.from_kwargs(num_kv_blocks=48), fixed_profile())
    read_s = 20 * spec.block_bytes / fixed_profile().disk_bytes_per_s
    # that step's block ops: the 20 blocks loaded (host -> cache) and the 20 it evicts for them spilled
    copy_s = 40 * spec.block_bytes / fixed_profile().swap_bytes_per_s
    last = max(rec.rows, key=lambda row: row[0])
    plain_last = max(plain.rows, key=lambda row: row[0])
    # the read keeps it waiting (the idle replica wakes when the read ends), then one step instead of the
    # prompt's recompute: here fixed-time steps, so its TTFT is the read plus one step with its copies
    assert last[5] == 320 and plain_last[5] == 0
    assert last[3] == pytest.approx(read_s + 0.01 + copy_s)
    all_blocks_back(sim)


def test_disk_tier_capacity_and_lru():
    tier = SimDiskTier(3, 0.5, lambda: now[0])
    now = [0.0]
    tier.save_op([0, 1, 2], [11, 12, 13])
    tier.save_op([3], [14])                       # 11 is the oldest: out
    assert list(tier.index) == [12, 13, 14] and tier.num_evicted == 1
    assert tier.fetch([12, 13]) is None and tier.wake_at() == 0.5   # one reader: 0.5 s per block
    now[0] = 1.0
    assert tier.fetch([12, 13]) == 2 and tier.wake_at() is None
    assert tier.fetch([12, 13, 11]) is None       # 11 is read (and found missing) after the reader is free
    now[0] = 2.0
    assert tier.fetch([12, 13, 11]) == 2
    tier.load_op([12, 13], [5, 6])                # the runner takes what it loads
    assert set(tier.staged) == {11}
    sim, rec = run(kv_store_dir="/nonexistent/kvflow-sim", kv_store_max_bytes=5 * engine_spec(
        EngineConfig.from_kwargs(num_kv_blocks=48), fixed_profile()).block_bytes)
    assert rec.summary(None, sim)["completed"] == 6
    all_blocks_back(sim)
