"""The cluster simulator (kvflow/sim): the simulated runner drives the real scheduler through the step
contract; a simulated run takes the same steps as the real engine; presets load and run; traces round-trip;
same seed, same result; every KV block comes back."""
import dataclasses
import gc
import json
import subprocess
import sys

import pytest

from kvflow.config import EngineConfig
from kvflow.memory.kv_cache_manager import extend_block_hashes
from kvflow.presets import PRESETS
from kvflow.sim.calibrate import fit
from kvflow.sim.cluster import Simulation, simulate, without_cyclic_gc
from kvflow.sim.compare import compare, preset_shape
from kvflow.sim.cost_model import (SMOLLM2_135M, HardwareProfile, load_profile, roofline_profile)
from kvflow.sim.replica import SimReplica, engine_spec
from kvflow.sim.workload import (SimRequest, WorkloadSpec, parse_workload, read_trace, workload_requests,
                                 write_trace)

from .conftest import needs_default_model


def fixed_profile(step_s: float = 0.01, per_token: float = 0.0, **kw) -> HardwareProfile:
    """A cost model whose step time is fixed (plus an optional per-prefill-token part)."""
    return HardwareProfile(name="fixed", kind="linear", source="test", model=dict(SMOLLM2_135M),
                           params={"coef": [step_s, 0.0, per_token, 0.0, 0.0]}, **kw)


def all_blocks_back(sim) -> None:
    for r in sim.replicas():
        r.check()
        assert not r.scheduler.requests
        assert all(b.ref_count == 0 for b in r.kv.pool.blocks)


def simulate_leaving_no_cycles(config, profile, requests):
    """simulate(), asserting that the run made no reference cycles (cluster.without_cyclic_gc turns the
    cyclic collector off during runs on that ground): with the collector off throughout, a collection after the
    run, while the Simulation is still alive, finds nothing to free. What lived before the run is frozen (the
    collection then looks at the run's objects alone, not at every model the session loaded: seconds each)."""
    gc.freeze()
    try:
        with without_cyclic_gc():          # (simulate's own, inside, leaves it off)
            sim, rec = simulate(config, profile, requests)
            assert gc.collect() == 0, "the run left reference cycles"
    finally:
        gc.unfreeze()
    return sim, rec


def clocked_step(rep, now: list[float]):
    """A function that runs one step of SimReplica `rep` on a hand-driven clock (`now[0]`, advanced by the
    step's seconds) and returns its outputs (None when nothing was scheduled)."""
    def step():
        seconds = rep.begin_step()
        if seconds is not None:
            now[0] += seconds
            return rep.end_step()[1]
    return step


# ---- the step contract ---------------------------------------------------------------------------------

def test_sim_runner_follows_the_step_contract():
    config = EngineConfig.from_kwargs(num_kv_blocks=9, max_num_seqs=3, max_num_batched_tokens=32,
                                      preemption_mode="swap", num_swap_blocks=64)
    now = [0.0]
    rep = SimReplica(0, engine_spec(config, fixed_profile()), fixed_profile().cost_model(), lambda: now[0],
                     track_tables=True)
    for i, n in enumerate((40, 25, 60, 10)):
        rep.add(f"q{i}", list(range(1 + i, 1 + i + n)), 12, 0.0)
    told, steps = set(), 0
    while rep.has_work():
        seconds = rep.begin_step()
        sched, result, _ = rep._step
        told |= {n.req_id for n in sched.new_requests}
        assert all(s.req_id in told for s in sched.rows())      # told before it is scheduled, once
        assert result.req_ids == [s.req_id for s in sched.rows()]
        assert [bool(t) for t in result.sampled_token_ids] == [s.sample for s in sched.rows()]
        for s in sched.rows():         # the runner's block tables are the KV manager's
            assert rep.runner.tables[s.req_id] == rep.kv.block_ids(s.req_id)
        now[0] += seconds
        rep.end_step()
        steps += 1
    rep.begin_step()                      # the last finished ids reach the runner: it forgets them
    assert not rep.runner.seeds and not rep.runner.tables
    assert rep.scheduler.num_preemptions > 0 and rep.scheduler.num_swapped_out > 0
    rep.check()
    with pytest.raises(RuntimeError, match="before the runner was told"):
        from kvflow.step import ScheduledRequest, SchedulerOutput
        rep.runner.execute(SchedulerOutput.of([ScheduledRequest("ghost", 0, [1], [0])]))


def test_sim_runner_charges_block_ops():
    """A step's block ops (swaps out and in here) add their bytes at the profile's host-link rate to the
    forward's time, as ModelRunner applies them before its forward; a GPU's device-to-device copy reads and
    writes its HBM instead."""
    config = EngineConfig.from_kwargs(num_kv_blocks=9, max_num_seqs=3, max_num_batched_tokens=32,
                                      preemption_mode="swap", num_swap_blocks=64)
    profile = fixed_profile(swap_bytes_per_s=1e8)
    spec = engine_spec(config, profile)
    now = [0.0]
    rep = SimReplica(0, spec, profile.cost_model(), lambda: now[0])
    for i, n in enumerate((40, 25, 60, 10)):
        rep.add(f"q{i}", list(range(1 + i, 1 + i + n)), 12, 0.0)
    moved = 0
    while rep.has_work():
        seconds = rep.begin_step()
        if seconds is None:
            continue
        blocks = sum(len(op.src) for op in rep._step[0].block_ops)
        assert seconds == pytest.approx(0.01 + blocks * spec.block_bytes / 1e8)
        moved += blocks
        now[0] += seconds
        rep.end_step()
    assert moved > 0 and rep.scheduler.num_swapped_out > 0
    gpu = roofline_profile("h100").cost_model()
    assert gpu.block_op_seconds("copy", 1e6) == pytest.approx(2e6 / gpu.bytes_per_s)
    assert gpu.block_op_seconds("swap_in", 1e6) == pytest.approx(1e6 / gpu.profile.swap_bytes_per_s)


@needs_default_model
@pytest.mark.slow
def test_sim_takes_the_real_engines_steps(default_model_path):
    """Same requests, same options: the real EngineCore (the default model, greedy, ignore_eos) and the
    simulated replica schedule the same requests, the same tokens, in the same steps (preemptions too)."""
    import torch

    from kvflow.engine.core import EngineCore
    from kvflow.engine.input_processor import open_model
    from kvflow.engine.wire import EngineCoreRequest
    from kvflow.sampling.params import SamplingParams
    opts = dict(num_kv_blocks=7, max_num_seqs=4, max_num_batched_tokens=48, preemption_mode="recompute",
                num_threads=2)
    config = EngineConfig.from_kwargs(**opts)
    prompts = [[7 + (i * 13 + j) % 900 for j in range(n)] for i, n in enumerate((20, 35, 50, 12, 70, 28))]
    prompts[3] = prompts[1][:16] + prompts[3]                   # a shared prefix: a prefix-cache hit
    max_tokens = [6, 9, 5, 8, 7, 10]

    def log_steps(scheduler, step):
        steps = []
        orig = scheduler.schedule

        def schedule():
            out = orig()
            if out.rows():
                steps.append([(s.req_id, s.num_computed_tokens, len(s.token_ids), s.sample) for s in out.rows()])
            return out
        scheduler.schedule = schedule
        while scheduler.has_unfinished():
            step()
        return steps

    rc, reader, _ = open_model(config)
    core = EngineCore.build(rc, reader)
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        core.add_request(EngineCoreRequest(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0),
                                           [], m, 0.0))
    with torch.inference_mode():
        real = log_steps(core.scheduler, core.step)
    core.check_blocks()

    now = [0.0]
    rep = SimReplica(0, engine_spec(config, fixed_profile()), fixed_profile().cost_model(), lambda: now[0])
    assert rep.kv.num_blocks == rc.num_kv_blocks
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        rep.add(f"r{i}", p, m, 0.0)

    simulated = log_steps(rep.scheduler, clocked_step(rep, now))
    rep.check()
    assert simulated == real
    assert rep.scheduler.num_preemptions == core.scheduler.num_preemptions > 0
    assert rep.kv.num_hits == core.kv.num_hits > 0


def test_requests_arriving_at_one_instant_share_the_step_that_starts_then():
    """An offline batch (every request at t = 0) and a burst later: the step that starts at their instant
    holds them all, as the real engine adds what its queue holds before it schedules (the first arrival
    kicks the step; the workload is read one arrival ahead, so the step once started with two)."""
    config = EngineConfig.from_kwargs(max_num_seqs=16, max_num_batched_tokens=512, num_kv_blocks=64)
    sim = Simulation(config, fixed_profile(0.01))
    scheduler = sim.prefill.replicas[0].scheduler
    steps, orig = [], scheduler.schedule

    def schedule():
        out = orig()
        if out.rows():
            steps.append((sim.now, len(out.rows()), out.num_scheduled_tokens))
        return out
    scheduler.schedule = schedule
    burst = [SimRequest(0.0, [5 + i] * 20, 3) for i in range(6)] + [SimRequest(1.0, [50 + i] * 10, 2) for i in range(5)]
    rec = sim.run(burst)
    assert steps[0] == (0.0, 6, 120)                   # all six prompts in the first step
    assert (1.0, 5, 50) in steps                       # the burst at 1 s: all five in the step starting then
    assert len(rec.rows) == 11
    all_blocks_back(sim)


# ---- presets, traces, determinism, invariants -----------------------------------------------------------------

def test_every_preset_loads_and_runs():
    w = parse_workload("chat:n=40,rate=30,seed=3")
    for name in PRESETS:
        config = EngineConfig.from_kwargs(preset=name, num_kv_blocks=512, **preset_shape(name, 2))
        sim, rec = simulate_leaving_no_cycles(config, load_profile("h100"), workload_requests(w))
        s = rec.summary({"ttft": 5000}, sim)
        assert s["completed"] == 40 and s["failed"] == 0, name
        assert s["total_output_tokens"] == sum(r.output_len for r in workload_requests(w)), name
        all_blocks_back(sim)
    assert preset_shape("mooncake", 5) == {"prefill_replicas": 2, "decode_replicas": 3}
    assert preset_shape("deepflow", 3) == {"max_replicas": 3, "min_replicas": 0}
    with pytest.raises(ValueError, match="presets"):
        preset_shape("tgi", 2)


def test_trace_round_trips(tmp_path):
    reqs = list(workload_requests(parse_workload("multitenant:n=24,rate=5,turns=3,tenants=2,seed=1")))
    tokens, hashed = tmp_path / "tokens.jsonl", tmp_path / "hashes.jsonl"
    assert write_trace(reqs, str(tokens)) == write_trace(reqs, str(hashed), block_size=16) == 24
    back = list(read_trace(str(tokens)))
    assert [(r.arrival_s, r.prompt_token_ids, r.output_len, r.user) for r in back] == \
        [(r.arrival_s, r.prompt_token_ids, r.output_len, r.user) for r in reqs]
    from_hashes = list(read_trace(str(hashed)))       # other tokens, the same prefixes
    for a, b in zip(reqs, from_hashes):
        assert len(a.prompt_token_ids) == len(b.prompt_token_ids)
        ha, hb = extend_block_hashes([], a.prompt_token_ids, 16), extend_block_hashes([], b.prompt_token_ids, 16)
        assert len(ha) == len(hb)
    def shared_blocks(reqs):          # leading blocks shared, per pair of requests
        chains = [extend_block_hashes([], r.prompt_token_ids, 16) for r in reqs]
        return [sum(1 for a, b in zip(chains[i], chains[j]) if a == b) for i in range(24) for j in range(i)]
    assert shared_blocks(from_hashes) == shared_blocks(reqs) and max(shared_blocks(reqs)) >= 18
    config = EngineConfig.from_kwargs()
    summaries = [simulate(config, fixed_profile(0.01, 1e-4), read_trace(str(p)))[1].summary(None)
                 for p in (tokens, hashed)]
    assert summaries[0] == summaries[1] and summaries[0]["prefix_cache_hit_rate"] > 0.3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 1.0, "output_len": 0, "prompt_token_ids": [1, 2]}\n')
    with pytest.raises(ValueError, match="output_len"):
        list(read_trace(str(bad)))


def test_same_seed_same_result():
    config = EngineConfig.from_kwargs(preset="preble", replicas=3, num_kv_blocks=120)
    runs = [simulate(config, load_profile("a100"), workload_requests(parse_workload(f"chat:n=120,rate=40,seed={s}")))
            for s in (7, 7, 8)]
    rows = [rec.rows for _, rec in runs]
    assert rows[0] == rows[1] and rows[0] != rows[2]
    assert runs[0][1].timeline() == runs[1][1].timeline()


def test_parallel_run_is_the_one_process_run_split():
    """simulate_parallel: at a vanishing sync width it is the one-process run; at any width its result does not
    depend on the number of workers (the router's state, here a prefix index fed by finishes, included), even
    under preemption; below saturation a 2 ms width moves throughput and median TTFT little. Every request is
    answered once, and each worker checks its replicas' blocks."""
    from kvflow.sim.parallel import simulate_parallel
    profile = load_profile("a100")

    def requests(rate, n=300):
        return workload_requests(parse_workload(f"chat:n={n},rate={rate},seed=3"))

    def key(rec):
        return sorted(rec.rows), sorted(rec.itls), rec.num_added

    for router in ("least-load", "cache-aware"):
        config = EngineConfig.from_kwargs(replicas=6, router=router, num_kv_blocks=160)   # preempts
        _, one = simulate(config, profile, requests(2000))
        _, tiny = simulate_parallel(config, profile, requests(2000), workers=1, sync_s=1e-9)
        assert key(tiny) == key(one)
        psim, local = simulate_parallel(config, profile, requests(2000), workers=1, sync_s=2e-3)
        _, split = simulate_parallel(config, profile, requests(2000), workers=2, sync_s=2e-3)
        assert key(split) == key(local) and split.rows == local.rows
        s = split.summary(None, psim)
        assert s["completed"] == 300 and s["preemptions"] > 0 and s["num_steps"] > 0

        config = EngineConfig.from_kwargs(replicas=6, router=router, num_kv_blocks=2000)
        sim, one = simulate(config, profile, requests(300, 600))
        psim, split = simulate_parallel(config, profile, requests(300, 600), workers=2, sync_s=2e-3)
        s, s1 = split.summary(None, psim), one.summary(None, sim)
        assert s["completed"] == s1["completed"] == 600
        assert abs(s["output_throughput"] / s1["output_throughput"] - 1) < 0.02
        assert abs(s["median_ttft_ms"] / s1["median_ttft_ms"] - 1) < 0.1
    with pytest.raises(ValueError, match="colocated"):
        simulate_parallel(EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1), profile, requests(10))
    with pytest.raises(ValueError, match="workers"):
        simulate_parallel(EngineConfig.from_kwargs(replicas=2), profile, requests(10), workers=0)
    for workers in (1, 2):     # the same error in one process and from a worker process (not a hang)
        with pytest.raises(ValueError, match="num_kv_blocks is too small") as err:
            simulate_parallel(EngineConfig.from_kwargs(replicas=2, num_kv_blocks=4), profile, requests(10),
                              workers=workers)
        notes = getattr(err.value, "__notes__", ())
        assert (workers == 2) == any("in a simulation worker" in note for note in notes)   # its traceback


def test_a_recorded_placement_replays_the_run():
    """fidelity's two-replica check replays the real run's placement (Placement); replaying a simulation's own
    placement (Recording) gives that simulation's rows exactly."""
    from kvflow.sim.cluster import Simulation
    from kvflow.sim.fidelity import Placement, Recording
    config = EngineConfig.from_kwargs(replicas=3, router="cache-aware", num_kv_blocks=400)
    runs = []
    for make in (Recording, lambda _: Placement(runs[0][0].prefill.router.placed)):
        sim = Simulation(config, load_profile("a100"))
        sim.prefill.router = make(sim.prefill.router)
        runs.append((sim, sim.run(workload_requests(parse_workload("chat:n=90,rate=60,seed=2")))))
    assert len(set(runs[0][0].prefill.router.placed)) == 3
    assert runs[0][1].rows == runs[1][1].rows


def test_jittered_step_times_are_seeded_per_replica():
    """step_noise: each replica's step times jittered from its own seeded generator: the same seed gives the same
    run (split over workers or not), another seed another; fidelity's ensemble of such runs."""
    from kvflow.sim.fidelity import ensemble
    from kvflow.sim.parallel import simulate_parallel
    profile = load_profile("a100")

    def run(seed, workers=0):
        config = EngineConfig.from_kwargs(replicas=4, num_kv_blocks=400, seed=seed)
        requests = workload_requests(parse_workload("chat:n=120,rate=200,seed=4"))
        if workers:
            return simulate_parallel(config, profile, requests, workers, sync_s=1e-9, step_noise=0.05)[1]
        return simulate(config, profile, requests, step_noise=0.05)[1]
    base = simulate(EngineConfig.from_kwargs(replicas=4, num_kv_blocks=400), profile,
                    workload_requests(parse_workload("chat:n=120,rate=200,seed=4")))[1]
    assert run(1).rows == run(1).rows != run(2).rows != base.rows
    assert sorted(run(1).rows) == sorted(run(1, workers=2).rows)
    e = ensemble(EngineConfig.from_kwargs(replicas=2, num_kv_blocks=400), profile,
                 parse_workload("random:n=40,rate=50,input=64,output=16,seed=1"), base.summary(None), runs=4)
    lo, hi = e["ensemble_range"]["median_tpot_ms"]
    assert e["step_noise"] > 0 and lo <= e["metrics_ensemble"]["median_tpot_ms"]["sim"] <= hi
    with pytest.raises(ValueError, match="step_noise"):
        simulate(EngineConfig.from_kwargs(replicas=2), profile, [], step_noise=-1)


def test_load_tables_follow_every_load_change(monkeypatch):
    """The pools' LoadTables (least-load reads their kept values) match the loads at every route, in each
    shape that routes: replicas, P/D (both pools), serverless."""
    from kvflow.sim import cluster
    checked = []
    choose = cluster.Pool.choose

    def checking(pool, req):
        pool.loads.check()
        checked.append(pool)
        return choose(pool, req)
    monkeypatch.setattr(cluster.Pool, "choose", checking)
    w = parse_workload("chat:n=150,rate=300,seed=4")
    for kw in (dict(replicas=4, router="least-load"), dict(preset="splitwise", prefill_replicas=2, decode_replicas=2,
                                                         kv_transfer="async"),
               dict(preset="deepflow", max_replicas=3, target_ongoing_requests=2)):
        sim, rec = simulate(EngineConfig.from_kwargs(num_kv_blocks=200, **kw), fixed_profile(0.02, 1e-4),
                            workload_requests(w))
        assert rec.summary(None, sim)["completed"] == 150, kw
        for pool in (sim.prefill, sim.decode):
            if pool is not None:
                pool.loads.check()
    assert len(checked) > 300


def test_hot_objects_keep_their_attributes_under_cpythons_shared_keys_limit():
    """An instance with 30 attributes or more no longer shares its dict's keys with its class (CPython 3.11's
    SHARED_KEYS_MAX_SIZE), and every `self.x` read in its methods falls off the fast path: two more on the
    Scheduler cost 1.5% of a simulation's instructions (callgrind). Objects read once per request per step."""
    sim = Simulation(EngineConfig.from_kwargs(replicas=2, num_kv_blocks=64), load_profile("h100"))
    r = sim.prefill.replicas[0]
    for obj in (sim, sim.rec, r, r.scheduler, r.kv, r.kv.pool, r.runner, r.runner.cost):
        assert len(vars(obj)) < 30, f"{type(obj).__name__} has {len(vars(obj))} attributes"


def test_blocks_come_back_under_pressure_and_in_every_shape():
    w = parse_workload("random:n=60,rate=200,input=120,output=40,range=0.5,seed=2")
    shapes = [dict(num_kv_blocks=40, max_num_seqs=16, preemption_mode="recompute"),
              dict(num_kv_blocks=40, max_num_seqs=16, preemption_mode="swap", num_swap_blocks=80),
              dict(preset="fastserve", num_kv_blocks=60, num_swap_blocks=200),
              dict(preset="orca", num_kv_blocks=60),
              dict(preset="splitwise", prefill_replicas=2, decode_replicas=1, num_kv_blocks=60),
              dict(preset="deepflow", max_replicas=3, num_kv_blocks=60)]
    preempted = 0
    for kw in shapes:
        sim, rec = simulate_leaving_no_cycles(EngineConfig.from_kwargs(**kw), fixed_profile(0.02, 1e-4),
                                              workload_requests(w))
        s = rec.summary(None, sim)
        assert s["completed"] == 60, kw
        preempted += s["preemptions"]
        all_blocks_back(sim)
    assert preempted > 0


def test_pd_transfer_modes_expose_less_when_overlapped():
    w = parse_workload("random:n=20,rate=5,input=600,output=8,seed=4")
    exposed = {}
    for mode in ("sync", "async", "layerwise"):
        config = EngineConfig.from_kwargs(preset="splitwise", kv_transfer=mode, max_num_batched_tokens=256)
        prof = fixed_profile(0.01, 1e-4, link_bytes_per_s=1e9)
        sim, rec = simulate(config, prof, workload_requests(w))
        exposed[mode] = rec.summary(None, sim)["mean_kv_transfer_ms"]
        all_blocks_back(sim)
    full = 600 * prof.kv_bytes_per_token / 1e9 * 1e3
    assert exposed["sync"] == pytest.approx(full, rel=0.02)
    assert full / 30 < exposed["async"] <= full * 256 / 600 + 1e-9       # the last chunk's share (at most 256)
    assert exposed["layerwise"] == pytest.approx(full / 30, rel=0.02)  # one layer's share


def test_serverless_scales_with_load():
    w = WorkloadSpec(kind="random", n=300, rate=20, bursts=6, burst_period=20, burst_duty=0.2, input=64, output=16)
    config = EngineConfig.from_kwargs(preset="deepflow", max_replicas=4, target_ongoing_requests=2,
                                      scale_down_idle_s=2.0, warm_pool=0)
    prof = fixed_profile(0.03, 1e-4, cold_start_s=3.0)
    sim, rec = simulate(config, prof, workload_requests(w))
    s = rec.summary(None, sim)
    assert s["completed"] == 300
    up = rec.timeline()["replicas_up"]
    assert max(up) > 2 and min(up) < max(up) - 1          # scaled up in bursts, down between them
    assert s["p99_ttft_ms"] >= 3000 * 0.9                  # the first requests waited for a cold start
    assert s["replica_seconds"] < 4 * rec.end_s


def test_workload_and_profile_errors_name_the_field():
    for text, field in (("chat:n=0", "n"), ("chat:rate=-1", "rate"), ("poisson:n=3", "workload"),
                        ("random:foo=1", "KEY=VALUE"), ("random:input=x", "input")):
        with pytest.raises(ValueError, match=field):
            parse_workload(text)
    with pytest.raises(ValueError, match="hardware"):
        load_profile("tpu-v9")
    with pytest.raises(ValueError, match="coef"):
        HardwareProfile(name="x", kind="linear", source="t", model=dict(SMOLLM2_135M),
                        params={"coef": [1, 2]}).cost_model()


def test_cost_models():
    h100, a100 = roofline_profile("h100").cost_model(), roofline_profile("a100").cost_model()
    assert "roofline" in load_profile("h200").source
    decode = h100.step_seconds(8, 0, 8 * 512, 0)
    assert decode < a100.step_seconds(8, 0, 8 * 512, 0)
    assert h100.step_seconds(0, 4096, 0, 4096 * 2048) > 2 * decode             # big prefills are compute bound
    samples = []
    true = [0.005, 0.0015, 0.001, 0.003, 0.02, 0.03]     # and 30 ms more for a step of over 64 tokens
    for rows, prefill, ctx in ((1, 0, 100), (4, 0, 900), (16, 0, 5000), (0, 256, 0), (0, 900, 0), (3, 200, 600),
                               (8, 0, 3000), (0, 64, 0), (2, 500, 300), (32, 0, 9000), (0, 1500, 0), (5, 50, 1000),
                               (0, 48, 0), (0, 96, 0), (2, 80, 100)):
        pairs = prefill * prefill / 2
        t = true[0] + true[1] * rows + true[2] * prefill + true[3] * ctx / 1e3 + true[4] * pairs / 1e6 + \
            true[5] * (rows + prefill > 64)
        samples.append(((rows, prefill, ctx, pairs), t))
    samples.append(((1, 0, 100, 0.0), 0.5))              # one step slowed by another process: dropped
    coef, quality = fit(samples)
    assert coef == pytest.approx(true, rel=1e-3) and quality["num_dropped_slow"] == 1
    assert quality["knee_tokens"] == [64]
    model = HardwareProfile("fit", "linear", "test", dict(SMOLLM2_135M),
                            params={"coef": coef, "knee_tokens": [64]}).cost_model()
    assert model.step_seconds(0, 65, 0, 0) - model.step_seconds(0, 64, 0, 0) == pytest.approx(0.031, rel=0.01)
    assert quality["hinge_tokens"] == []              # no slope change in these steps: none is taken
    # a slope change: a step's first 128 tokens cost 0.6 ms each more than the rest (few-row matmuls run
    # slower); a straight line through small and big prompt steps cannot price both, the hinge term can
    slope = [(s, t + 0.6 * min(s[0] + s[1], 128) / 1e3) for s, t in samples[:-1]]
    coef, quality = fit(slope)
    assert quality["hinge_tokens"] == [128] and quality["knee_tokens"] == [64]
    assert coef == pytest.approx(true + [0.6], rel=1e-3)
    model = HardwareProfile("fit", "linear", "test", dict(SMOLLM2_135M),
                            params={"coef": coef, "knee_tokens": [64], "hinge_tokens": [128]}).cost_model()
    assert model.step_seconds(0, 2000, 0, 2000 ** 2 / 2) == pytest.approx(
        true[0] + true[2] * 2000 + true[4] * 2000 ** 2 / 2e6 + true[5] + 0.6 * 128 / 1e3, rel=1e-3)
    with pytest.raises(ValueError, match="coef must be 7"):      # a hinge needs its coefficient
        HardwareProfile("fit", "linear", "test", dict(SMOLLM2_135M),
                        params={"coef": coef[:6], "knee_tokens": [64], "hinge_tokens": [128]}).cost_model()
    from kvflow.step import ScheduledRequest, SchedulerOutput
    sched = SchedulerOutput.of([ScheduledRequest("a", 10, [5], [], sample=True),
                                ScheduledRequest("b", 0, [1] * 32, [])])
    assert sched.shape() == (1, 32, 11, 32 * 16)


def test_compare_and_cli(tmp_path):
    result = compare(["vllm", "distserve", "kvflow"], parse_workload("chat:n=30,seed=5"), load_profile("h100"), 2,
                     [10.0, 40.0], {"ttft": 1000, "tpot": 50}, {"num_kv_blocks": 512})
    assert [r["preset"] for r in result["rows"]] == ["vllm", "distserve", "kvflow"]
    assert all(len(r["points"]) == 2 and r["points"][1]["summary"]["completed"] == 30 for r in result["rows"])
    out = tmp_path / "sim.json"
    proc = subprocess.run([sys.executable, "-m", "kvflow", "sim", "--workload", "random:n=20,rate=8,input=64",
                           "--hardware", "h200", "--replicas", "2", "--num-kv-blocks", "512",
                           "--out-json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Prefix cache hit rate" in proc.stdout
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == 20 and data["timeline"]["utilisation"]
    proc = subprocess.run([sys.executable, "-m", "kvflow", "sim", "--workload", "random:n=20,rate=8,input=64",
                           "--hardware", "h200", "--replicas", "2", "--num-kv-blocks", "512", "--workers", "2",
                           "--step-noise", "0.02",
                           "--out-json", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["summary"]["completed"] == 20
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, kvflow.sim.cli, kvflow.sim.cluster, kvflow.sim.compare; "
                               "print(' '.join(m for m in sys.modules if m.startswith('torch')))"],
        capture_output=True, text=True).stdout
    proc = subprocess.run([sys.executable, "-m", "kvflow", "sim", "--workload", "chat:rate=0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "rate" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kvflow", "sim", "--workload", "chat:n=10,rate=10", "--replicas", "2",
                           "--num-kv-blocks", "4", "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "num_kv_blocks is too small" in proc.stderr    # a worker's error, as in one
    assert "Traceback" not in proc.stderr                                          # process: no crash
    proc = subprocess.run([sys.executable, "-m", "kvflow", "sim", "calibrate", "--out", str(tmp_path / "p.json"),
                           "--together", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--together" in proc.stderr


@needs_default_model
@pytest.mark.slow
def test_fidelity_against_a_fresh_calibration(default_model_path, monkeypatch):
    """A small benchmarks/sim_fidelity.py: calibrate on a fresh engine, serve a workload with it twice, simulate
    the same workload with the fresh profile, compare with the real runs' median. The requests all arrive at
    once: with a dozen short requests arriving over time, whether a request's few decode steps share a step
    with another's prefill turns on milliseconds of real-time jitter, and its TPOT doubles or not (the
    benchmark's 64 requests average that out). The issue's targets are 10% (medians) and 20% (p99); this
    allows 25%, and skips when the real run's own steps took more than 25% more (or less) than their
    calibrated times: the machines tests run on are shared, and other processes (cores, memory bandwidth)
    slow the real run, not the simulated one. A check that misses (or is spoiled) is measured once more."""
    from kvflow.sim import calibrate as cal
    monkeypatch.setattr(cal, "SWEEP", (24, 25, 32, 33, 64, 65))     # the kernel switches seen so far (x86)
    for _ in range(2):         # a shared machine: a check that its neighbours spoiled is measured once more
        m, why = _fidelity_check()
        if why is None:
            return
    if why.startswith("busy"):
        pytest.skip(f"{why}: not comparable ({m})")
    raise AssertionError(f"{why} ({m})")


def _fidelity_check() -> tuple[dict, str | None]:
    """One calibration and two real runs against the simulation (the result's whole shape asserted); its
    metrics and None, or why it is not met: "busy ..." when the machine changed speed under it (the real
    steps far from their calibrated times), else what missed (the calibration's fit, or a metric)."""
    from kvflow.sim.fidelity import fidelity
    plan = ((1, 32, 12), (4, 96, 12), (1, 300, 4), (12, 24, 12), (2, 160, 8), (3, 64, 6), (1, 120, 4))
    result = fidelity({"num_threads": 1, "max_num_seqs": 8}, parse_workload(
        "random:n=12,rate=1000,input=96,output=12,range=0.5,seed=1"), plan, real_runs=2, served=True, bracket=True)
    m = result["metrics"]
    assert set(result["metrics_bracket"]) == set(m)     # also fitted with the held-out run after the real runs
    assert set(result["metrics_insample"]) == set(m)    # and with the real runs' own steps
    bands = result["real_median_band"]                  # each run's median, a twentieth of the requests away
    assert len(bands) == 2 and all(lo <= 0.0 <= hi for b in bands for lo, hi in b.values())
    assert [len(r) for r in result["record"]["real_requests"]] == [12, 12]    # each request's TTFT and TPOT
    corr = result["per_request_corr"]           # request by request: simulated and in-sample vs each real run
    assert set(corr) == {"simulation", "insample", "real"} and [len(corr[k]) for k in corr] == [2, 2, 1]
    assert all(-1.0 <= r <= 1.0 for runs in corr.values() for c in runs for r in c.values() if r is not None)
    assert len(result["record"]["served_after_steps"]) >= 12
    assert len(result["real_runs"]) == 2 and set(result["real_spread"]) == set(m)   # compared with their median
    runs = result["runs"]                 # and with each run alone: the prediction and a fit of its own steps
    assert len(runs) == 2 and all(r["step_ratio"] > 0 and set(r["metrics"]) == set(m) for r in runs)
    for run, real in zip(runs, result["real_runs"]):
        assert all(row["real"] == pytest.approx(real[key], abs=1e-3) for key, row in run["metrics"].items())
        assert all(row["sim"] == m[key]["sim"] for key, row in run["metrics"].items())
        assert set(run.get("metrics_insample", m)) == set(m)
    for key, row in m.items():
        assert row["real"] == pytest.approx(sum(r[key] for r in result["real_runs"]) / 2, rel=1e-3, abs=1e-3)
    assert result["profile"]["fit"]["num_steps"] >= 40
    probes = result["machine"]["probes"]            # the machine's own speed: before, and after each real run
    assert len(probes) == 3 and all(p["memory_ms"] > 0 and p["python_ms"] > 0 for p in probes)
    if result["profile"]["fit"]["r2"] <= 0.8:
        return m, f"the calibration's fit explains its own steps poorly (r2 {result['profile']['fit']['r2']:.3f})"
    ratio = result["real_step_ratio"]     # the real run's steps against their calibrated times
    if not 0.8 < ratio < 1.25:
        return m, (f"busy: the machine changed speed between calibration and the run (its steps took {ratio:.2f}x "
                   f"their calibrated time: other processes on the shared cores)")
    for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_tpot_ms"):
        if m[key]["rel_error"] >= 0.25:
            return m, f"{key} off by {m[key]['rel_error']:.1%}"
    return m, None


def test_machine_probe_times_its_two_kernels_and_their_spread():
    from kvflow.sim.probe import probe, spread
    p = probe(matrix_mb=4, repeats=3)
    assert set(p) == {"memory_ms", "python_ms"} and p["memory_ms"] > 0 and p["python_ms"] > 0
    assert spread([{"memory_ms": 10.0, "python_ms": 4.0}, {"memory_ms": 12.0, "python_ms": 4.0}]) == {
        "memory_ms": 0.2, "python_ms": 0.0}
    assert spread([p]) == {"memory_ms": 0.0, "python_ms": 0.0}
    with pytest.raises(ValueError, match="repeats"):
        probe(repeats=0)


def test_median_band_is_where_a_twentieth_of_the_values_crossing_the_median_puts_it():
    from kvflow.sim.fidelity import median_band
    assert median_band([10.0] * 40) == [0.0, 0.0]
    lo, hi = median_band([20.0] * 27 + [60.0] * 24)        # two modes, the median at the top of the lower:
    assert lo == 0.0 and hi == pytest.approx(2.0)           # two requests crossing it triple it
    assert median_band([]) == [0.0, 0.0]


def test_request_correlation_compares_two_runs_request_by_request():
    from kvflow.sim.fidelity import request_correlation
    a = [(100.0, 20.0), (200.0, 60.0), (300.0, None), (400.0, 40.0)]
    assert request_correlation(a, [(2 * t, 3 * p if p else None) for t, p in a]) == {"ttft": 1.0, "tpot": 1.0}
    assert request_correlation(a, [(-t, 20.0) for t, _ in a]) == {"ttft": -1.0, "tpot": None}   # no spread
    assert request_correlation(a, a[:3]) is None          # not the same requests


def test_fidelity_real_runs_must_be_a_positive_integer(tmp_path):
    from kvflow.sim.fidelity import fidelity
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="real_runs"):     # before any engine is built
            fidelity({}, parse_workload("random:n=2"), real_runs=bad)
    for bad in (0, -0.5, 10, True, "0.5"):
        with pytest.raises(ValueError, match="load"):
            fidelity({}, parse_workload("random:n=2"), load=bad)
    with pytest.raises(ValueError, match="bracket needs served"):
        fidelity({}, parse_workload("random:n=2"), served=False, bracket=True)
    trace = tmp_path / "t.jsonl"
    write_trace(workload_requests(parse_workload("random:n=2")), str(trace))
    for kw in ({"load": 0.5}, {"served": True}, {"replicas": 2}):      # (two replicas: served by default)
        with pytest.raises(ValueError, match="a trace file .* load and served need a generated workload"):
            fidelity({}, str(trace), **kw)


def test_fidelity_fits_served_steps_by_default_where_it_can(tmp_path):
    """A generated workload has a held-out draw (its next seed): fitted with its served steps, one engine or
    several; one engine on a trace file keeps the plan's fit."""
    from kvflow.sim.fidelity import served_by_default
    generated = parse_workload("random:n=2")
    assert served_by_default(generated, 1) and served_by_default(generated, 2)
    assert not served_by_default(str(tmp_path / "t.jsonl"), 1)
    assert served_by_default(str(tmp_path / "t.jsonl"), 2)       # (then refused: a fleet needs served steps)


def test_capacity_is_the_rate_a_fleet_saturates_at():
    """fidelity's `load` rests on capacity(): below it the simulated fleet keeps up with the arrivals, above it
    the requests served per second stop rising with the rate."""
    from kvflow.sim.fidelity import capacity
    config = EngineConfig.from_kwargs(num_kv_blocks=256, max_num_seqs=8, replicas=2)
    profile = load_profile("cpu")
    workload = parse_workload("random:n=200,rate=1,input=120,output=16,range=0.5,seed=4")
    cap = capacity(config, profile, workload)
    assert cap == capacity(config, profile, workload) > 0      # deterministic

    def served(load):
        wl = WorkloadSpec(**{**workload.__dict__, "rate": load * cap})
        return simulate(config, profile, workload_requests(wl))[1].summary(None)["request_throughput"]
    assert served(0.5) == pytest.approx(0.5 * cap, rel=0.15)
    assert served(1.5) == pytest.approx(cap, rel=0.15) and served(3.0) == pytest.approx(cap, rel=0.15)


@needs_default_model
def test_fleet_replay_answers_every_request_once(default_model_path):
    """The real side of a multi-replica fidelity check: two EngineCores on their own threads behind the real
    least-load router answer every request, each once and whole, and leave no block held."""
    from kvflow.sim.calibrate import build_core
    from kvflow.sim.replay import replay_fleet
    cores = [build_core({"num_threads": 1, "max_num_seqs": 4})[0] for _ in range(2)]
    reqs = list(workload_requests(parse_workload("random:n=8,rate=50,input=40,output=5,range=0.5,seed=3")))
    served = []
    for core in cores:
        add = core.add_request
        core.add_request = lambda r, add=add, core=core: served.append((core, r.request_id)) or add(r)
    results, duration = replay_fleet(cores, reqs, "least-load", 16)
    assert [r.output_tokens for r in results] == [r.output_len for r in reqs]
    assert all(0 < r.ttft <= r.e2e <= duration for r in results)
    assert sorted(rid for _, rid in served) == sorted(f"fid-{k}" for k in range(len(reqs)))   # each once
    assert {id(core) for core, _ in served} == {id(c) for c in cores}                         # both used
    for core in cores:
        assert not core.has_unfinished()
        core.check_blocks()
    # the router sees each request's user, as the simulator's does: the session router keeps a user on one replica
    sessions = [dataclasses.replace(r, user=f"user-{k // 4}") for k, r in enumerate(reqs)]
    placed: list[int] = []
    replay_fleet(cores, sessions, "session", 16, placed=placed)
    by_user = {u: {i for r, i in zip(sessions, placed) if r.user == u} for u in ("user-0", "user-1")}
    assert all(len(replicas) == 1 for replicas in by_user.values()), by_user
    for core in cores:
        core.check_blocks()


def test_replicas_measure_the_load_extras_only_where_a_policy_reads_them():
    """Router.load_extras: min-queue reads the queued prompt tokens, which a replica sums over its queues after
    every step; least-load reads none, and its replicas skip the sum. The elastic P/D rule reads them too."""
    w = parse_workload("chat:n=40,rate=400,seed=1")
    for router, measured in (("least-load", False), ("min-queue", True), ("min-ttft", True)):
        sim = Simulation(EngineConfig.from_kwargs(replicas=2, router=router, num_kv_blocks=256), fixed_profile())
        for r in sim.prefill.replicas:
            assert r.reports_extra is measured and ("queued_prefill_tokens" in r.load.extra) is measured
        r.count_placed(100)            # a prompt placed there: queued until its steps compute it
        assert r.load.extra.get("queued_prefill_tokens") == (100 if measured else None)
        sim = Simulation(EngineConfig.from_kwargs(replicas=2, router=router, num_kv_blocks=256), fixed_profile())
        sim.run(workload_requests(w))
        for r in sim.prefill.replicas:
            assert r.load.extra.get("queued_prefill_tokens", 0) == 0, router     # everything was computed
    elastic = Simulation(EngineConfig.from_kwargs(prefill_replicas=1, decode_replicas=1, pd_elastic=True,
                                                  num_kv_blocks=256), fixed_profile())
    assert all(r.reports_extra for r in elastic.replicas())
