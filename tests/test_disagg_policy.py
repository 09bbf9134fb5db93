"""The model-free parts of disaggregated serving: the prefill/decode routers (min-queue, min-ttft), the
elastic role rule, the host KV store (the shared pool) and its LRU, the options and the P/D presets."""
import numpy as np
import pytest

from kvflow.cluster.router import ReplicaLoad, RouteRequest, make_router
from kvflow.config import EngineConfig, SchedulerOptions
from kvflow.disagg.elastic import COOLDOWN_S, choose_switch
from kvflow.memory.host_store import HostKVStore
from kvflow.presets import PRESETS


def _req(rid="r", blocks=(), n=64):
    return RouteRequest(rid, list(blocks), n, 16)


def test_min_queue_places_by_queued_prompt_tokens_not_request_count():
    router = make_router("min-queue", 3)
    loads = [ReplicaLoad(0, num_assigned=1, extra={"queued_prefill_tokens": 4000}),
             ReplicaLoad(1, num_assigned=3, extra={"queued_prefill_tokens": 300}),
             ReplicaLoad(2, healthy=False)]
    assert router.route(_req(), loads) == 1


def test_min_ttft_weighs_queue_cached_prefix_and_transfer():
    router = make_router("min-ttft", 2, block_size=16)
    prefix = list(range(100, 110))                  # 10 blocks
    idle = [ReplicaLoad(0, extra={"prefill_tokens_per_s": 1000.0}),
            ReplicaLoad(1, extra={"prefill_tokens_per_s": 1000.0})]
    first = router.route(_req("a", prefix, 170), idle)
    # the same prefix again: the replica that caches it computes 10 tokens instead of 170
    assert router.route(_req("b", prefix, 170), idle) == first
    assert router.last_prediction[first] == pytest.approx(10 / 1000)
    # ... unless its queue outweighs the cached prefix
    busy = [ReplicaLoad(i, extra={"prefill_tokens_per_s": 1000.0, "queued_prefill_tokens": 500.0 if i == first else 0})
            for i in range(2)]
    assert router.route(_req("c", prefix, 170), busy) == 1 - first
    # with a transfer cost per block not cached, the replica that caches it wins despite its queue
    router = make_router("min-ttft", 2, block_size=16)
    first = router.route(_req("a", prefix, 170), idle)
    slow = [ReplicaLoad(i, extra={"prefill_tokens_per_s": 1000.0, "queued_prefill_tokens": 500.0 if i == first else 0,
                                  "transfer_s_per_block": 0.1}) for i in range(2)]
    assert router.route(_req("d", prefix, 170), slow) == first
    assert router.last_prediction == {first: pytest.approx(0.51), 1 - first: pytest.approx(0.17 + 1.0)}


def _loads(queued, decoding, kv=0.0):
    return [ReplicaLoad(0, extra={"queued_prefill_tokens": queued[0]}),
            ReplicaLoad(1, extra={"queued_prefill_tokens": queued[1]}),
            ReplicaLoad(2, num_assigned=decoding[0], kv_cache_usage=kv),
            ReplicaLoad(3, num_assigned=decoding[1], kv_cache_usage=kv)]


def test_elastic_roles_follow_the_load_mix():
    sched = SchedulerOptions(max_num_seqs=16, max_num_batched_tokens=256)
    roles = ["prefill", "prefill", "decode", "decode"]
    assert choose_switch(roles, _loads((0, 0), (2, 2)), sched, COOLDOWN_S) is None, "balanced: nothing moves"
    s = choose_switch(roles, _loads((3000, 2000), (1, 2)), sched, COOLDOWN_S)
    assert (s.worker, s.old, s.new) == (2, "decode", "prefill"), "prompts pile up: the lightest decoder helps"
    s = choose_switch(roles, _loads((0, 0), (14, 15)), sched, COOLDOWN_S)
    assert (s.worker, s.old, s.new) == (0, "prefill", "decode")
    s = choose_switch(roles, _loads((0, 0), (1, 1), kv=0.9), sched, COOLDOWN_S)
    assert s is not None and s.new == "decode", "decode KV nearly full"
    assert choose_switch(roles, _loads((3000, 2000), (1, 2)), sched, COOLDOWN_S / 2) is None, "cooldown"
    one_each = ["prefill", "decode", "decode", "decode"]
    s = choose_switch(one_each, _loads((0, 0), (14, 15)), sched, COOLDOWN_S)
    assert s is None, "the last prefill worker keeps its role"


def _blocks(n, value):
    return [np.full((n, 2, 3), value, dtype=np.float32), np.full((n, 2, 3), -value, dtype=np.float32)]


def test_host_kv_store_keeps_leading_runs_and_evicts_least_recently_used():
    block = 2 * 2 * 3 * 4                           # bytes of one block (two tensors of 2x3 float32)
    dtypes = ["float32", "float32"]
    store = HostKVStore(max_bytes=4 * block)
    assert store.put([1, 2, 3], dtypes, _blocks(3, 1.0)) == 3
    assert store.put([2, 3], dtypes, _blocks(2, 9.0)) == 0, "already held: not replaced"
    keys, got_dtypes, arrays = store.get([1, 2, 5, 3])
    assert keys == [1, 2] and got_dtypes == dtypes and arrays[0].shape == (2, 2, 3), "the leading run only"
    assert (arrays[0] == 1.0).all() and (arrays[1] == -1.0).all()
    assert store.get([1, 2, 3], skip=2)[0] == [3], "the caller already holds the first two"
    store.put([7, 8], dtypes, _blocks(2, 2.0))      # 5 blocks > 4: the least recently used goes
    assert store.match([1]) == 0 and store.stats()["evictions"] == 1
    assert store.match([2, 3]) == 2 and store.stats()["bytes"] <= 4 * block
    with pytest.raises(ValueError, match="do not match"):
        store.put([9], ["bfloat16", "bfloat16"], _blocks(1, 0.0))


def test_options_are_checked_at_start():
    with pytest.raises(ValueError, match="prefill_replicas and decode_replicas"):
        EngineConfig.from_kwargs(prefill_replicas=2)
    with pytest.raises(ValueError, match="prefill_replicas must be a non-negative integer"):
        EngineConfig.from_kwargs(prefill_replicas=-1, decode_replicas=1)
    with pytest.raises(ValueError, match="kv_transfer must be one of sync, async, layerwise"):
        EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, kv_transfer="rdma")
    with pytest.raises(ValueError, match="pd_policy"):
        EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, pd_policy="random")
    with pytest.raises(ValueError, match="choose one serving shape"):
        EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, replicas=2)
    with pytest.raises(ValueError, match="enable_prefix_caching must be on"):
        EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_transport must be one of ray, mooncake"):
        EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, kv_transport="nccl")
    with pytest.raises(ValueError, match="kv_transport mooncake carries sync transfers"):
        EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, kv_transport="mooncake", kv_transfer="async")
    with pytest.raises(ValueError, match="kv_transfer_timeout_s must be a positive number"):
        EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, kv_transfer_timeout_s=0)


@pytest.mark.parametrize("name,transfer,prefill,decode", [("distserve", "sync", "min-queue", "least-load"),
                                                          ("tetriinfer", "sync", "least-load", "power-of-two"),
                                                          ("splitwise", "async", "min-queue", "min-queue"),
                                                          ("mooncake", "layerwise", "min-ttft", "min-ttft")])
def test_the_survey_pd_presets(name, transfer, prefill, decode):
    c = EngineConfig.from_kwargs(preset=name)
    assert c.disagg.enabled and c.distributed and (c.disagg.prefill_replicas, c.disagg.decode_replicas) == (1, 1)
    assert (c.disagg.kv_transfer, c.cluster.router, c.disagg.pd_policy) == (transfer, prefill, decode)
    assert c.cache.enable_prefix_caching, "a decode worker takes its KV through the prefix cache"
    if name == "mooncake":
        assert c.disagg.kv_pool and c.disagg.early_rejection
    c = EngineConfig.from_kwargs(preset=name, prefill_replicas=3, decode_replicas=2)
    assert (c.disagg.prefill_replicas, c.disagg.decode_replicas) == (3, 2)
    assert set(PRESETS) >= {"distserve", "tetriinfer", "splitwise", "mooncake"}
