"""Replicas that share one machine: the calibration of engines stepping together (kvflow sim calibrate
--together), the simulator's co-run model (cost_model.OnSharedMachine), and the fidelity check's split of a
real fleet's steps by whether another replica was stepping."""
import dataclasses

import pytest

from kvflow.config import EngineConfig
from kvflow.sim.cluster import simulate
from kvflow.sim.cost_model import OnSharedMachine, SharedMachine, roofline_profile, step_ratio
from kvflow.sim.workload import parse_workload, workload_requests

from .conftest import needs_default_model
from .test_sim import all_blocks_back, fixed_profile


def test_a_step_beside_its_machines_others_is_slower():
    """OnSharedMachine: priced at its start by how many of the machine's other replicas are stepping then."""
    now = [0.0]
    machine = SharedMachine(3, slowdown=1.6)
    inner = roofline_profile("h100").cost_model()
    a, b, c = (OnSharedMachine(inner, machine, k, lambda: now[0]) for k in range(3))
    assert a.step_seconds(4, 0, 800, 0.0) == inner.step_seconds(4, 0, 800, 0.0)
    assert a.step_started(1.0) == 1.0                       # the others idle
    assert b.step_started(1.0) == pytest.approx(1.3)        # one of two others stepping: half the slowdown
    assert c.step_started(1.0) == pytest.approx(1.6)        # both
    now[0] = 1.2                                            # a has ended; b and c still step
    assert a.step_started(2.0) == pytest.approx(3.2)
    now[0] = 10.0
    assert b.step_started(1.0) == 1.0


def test_a_steps_slowdown_by_the_kinds_of_both_steps():
    """corun_by_kind: a decode beside another replica's decode is slowed by its own figure, beside a prefill by
    another; a pair the profile lacks takes corun_slowdown."""
    decode, prefill = 0, 3                                        # the steps' prompt tokens
    now = [0.0]
    machine = SharedMachine(2, slowdown=1.1, by_kind={"decode": {"decode": 1.4, "prefill": 1.05}})
    inner = roofline_profile("h100").cost_model()
    a, b = (OnSharedMachine(inner, machine, k, lambda: now[0]) for k in range(2))
    assert a.step_started(1.0, decode) == 1.0
    assert b.step_started(1.0, decode) == pytest.approx(1.4)       # a decode beside a decode
    now[0] = 1.2                                                  # a has ended; b steps until 1.4
    assert a.step_started(1.0, prefill) == pytest.approx(1.1)     # a prefill beside a decode: not given
    now[0] = 1.5                                                  # b has ended; a steps until 2.3
    assert b.step_started(1.0, decode) == pytest.approx(1.05)     # a decode beside a prefill
    with pytest.raises(ValueError, match="corun_by_kind"):
        fixed_profile(corun_by_kind={"decode": {"prefil": 1.2}})
    with pytest.raises(ValueError, match="corun_by_kind"):
        fixed_profile(corun_by_kind={"decode": {"decode": 0}})


def test_a_decodes_slowdown_on_its_fixed_cost():
    """corun_part "fixed": a decode beside another's step takes (f - 1) x its model's fixed cost (a step of
    nothing's price) longer, a one-row and an eight-row decode alike; a step with a prefill is still slowed as a
    whole; a roofline's fixed cost is its launch and the weights' read."""
    decode, prefill = 0, 3
    profile = fixed_profile(step_s=0.01, corun_part="fixed")
    profile.params["coef"] = [0.01, 0.004, 1e-3, 0.0, 0.0]
    model = profile.cost_model()
    assert model.fixed_seconds() == 0.01
    now = [0.0]
    machine = SharedMachine(2, slowdown=1.1, by_kind={"decode": {"decode": 1.5}})
    a, b = (OnSharedMachine(model, machine, k, lambda: now[0]) for k in range(2))
    assert a.step_started(100.0, prefill) == 100.0                  # alone
    one, eight = model.step_seconds(1, 0, 0, 0.0), model.step_seconds(8, 0, 0, 0.0)
    assert b.step_started(one, decode) == pytest.approx(one + 0.1 * 0.01)          # beside a prefill: 1.1 ...
    now[0] = 1.0                 # b has ended; a still steps (a prefill)
    assert b.step_started(eight, decode) == pytest.approx(eight + 0.1 * 0.01)      # ... on the fixed cost alike
    assert b.step_started(2.0, prefill) == pytest.approx(2.0 * 1.1)                # a prefill: as a whole
    now[0] = 500.0
    a.step_started(one, decode)
    assert b.step_started(eight, decode) == pytest.approx(eight + 0.5 * 0.01)      # beside a decode: 1.5
    roof = dataclasses.replace(roofline_profile("h100"), corun_part="fixed").cost_model()
    machine = SharedMachine(2, slowdown=1.5)
    c, d = (OnSharedMachine(roof, machine, k, lambda: now[0]) for k in range(2))
    c.step_started(1.0, decode)
    assert roof.fixed_seconds() == pytest.approx(roof.step_seconds(0, 0, 0, 0.0)) and roof.fixed_seconds() > 0
    assert d.step_started(1.0, decode) == pytest.approx(1.0 + 0.5 * roof.fixed_seconds())
    with pytest.raises(ValueError, match="corun_part"):
        fixed_profile(corun_part="weights")


def test_simulated_replicas_on_one_machine():
    """A profile with replicas_per_machine: at a slowdown of 1 the simulation is the plain one; above it, steps
    of replicas that share a machine take longer when they overlap (TPOT grows, and more with load), replicas
    on machines of their own do not; and a parallel run keeps each machine's replicas in one worker."""
    from kvflow.sim.parallel import simulate_parallel

    def run(rate, profile, replicas=2, **kw):
        config = EngineConfig.from_kwargs(replicas=replicas, num_kv_blocks=400)
        sim, rec = simulate(config, profile, workload_requests(parse_workload(
            f"random:n=60,rate={rate},input=64,output=16,seed=2")), **kw)
        all_blocks_back(sim)
        return rec.summary(None)

    plain = fixed_profile(0.01)
    for rate in (1, 200):
        base = run(rate, plain)
        assert run(rate, fixed_profile(0.01, replicas_per_machine=2, corun_slowdown=1.0)) == base
        slow = run(rate, fixed_profile(0.01, replicas_per_machine=2, corun_slowdown=1.5))
        assert slow["completed"] == 60 and slow["median_tpot_ms"] > base["median_tpot_ms"]
        assert slow["median_tpot_ms"] <= 1.5 * base["median_tpot_ms"] + 1e-6
    busy = run(200, fixed_profile(0.01, replicas_per_machine=2, corun_slowdown=1.5))
    assert busy["median_tpot_ms"] == pytest.approx(15.0, rel=0.05)      # both always stepping
    light = run(1, fixed_profile(0.01, replicas_per_machine=2, corun_slowdown=1.5))
    assert light["median_tpot_ms"] < 0.95 * busy["median_tpot_ms"]       # often alone
    assert run(200, fixed_profile(0.01, replicas_per_machine=1, corun_slowdown=1.5)) == run(200, plain)

    shared = fixed_profile(0.01, replicas_per_machine=2, corun_slowdown=1.4)
    config = EngineConfig.from_kwargs(replicas=6, num_kv_blocks=400)

    def requests():
        return workload_requests(parse_workload("chat:n=200,rate=400,seed=3"))
    _, one = simulate_parallel(config, shared, requests(), workers=1, sync_s=2e-3)
    _, split = simulate_parallel(config, shared, requests(), workers=2, sync_s=2e-3)
    assert sorted(split.rows) == sorted(one.rows)


def test_profile_fields_are_checked():
    with pytest.raises(ValueError, match="replicas_per_machine"):
        fixed_profile(replicas_per_machine=0)
    with pytest.raises(ValueError, match="corun_slowdown"):
        fixed_profile(corun_slowdown=0.0)


@pytest.mark.slow
def test_calibration_of_engines_stepping_together(tiny_model_dir, monkeypatch):
    """calibrate with two engines: the fit from one alone, then the plan on both at once, each on its own
    thread (every step of both measured); the engines end with nothing held, and an error on one thread comes
    back as that error (the other, keeping it company, stops) instead of a hang. A tiny model: the test is the
    protocol (tests/test_sim.py's fidelity check calibrates the default model)."""
    from kvflow.sim import calibrate as cal
    monkeypatch.setattr(cal, "SWEEP", (8, 9, 16, 17))       # a short plan
    model = tiny_model_dir("llama_gqa")
    built = [cal.build_core({"model": model, "num_threads": 1, "max_num_seqs": 4}) for _ in range(2)]
    plan = ((2, 24, 6), (1, 80, 3))
    profile = cal.calibrate({}, "pair", plan, cores=built)
    # (a tiny model's steps are interpreter bound: the two threads take turns at the GIL, up to ~4x slower)
    assert profile.replicas_per_machine == 2 and 0.5 < profile.corun_slowdown < 10.0
    assert abs(profile.fit["corun_steps"] - 2 * profile.fit["num_steps"]) <= 4
    assert "stepping at once" in profile.source
    for core, _, _ in built:
        assert not core.has_unfinished()
        core.check_blocks()
    one = cal.calibrate({}, "one", plan, cores=built[:1], workload=parse_workload(     # then fitted with served
        "random:n=8,rate=8,input=40,output=10,range=0.5,seed=1,vocab=512"))         # steps (calibrate --workload)
    assert one.fit["served_steps"] >= 20 and one.fit["plan_steps"] == one.fit["num_steps"] - one.fit["served_steps"]
    assert "fitted again with" in one.source and one.replicas_per_machine == 1
    core = built[1][0]
    step, calls = core.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("step 5 failed")
        return step()
    core.step = failing_step
    with pytest.raises(RuntimeError, match="step 5 failed"):
        cal.measure_together([b[:2] for b in built], plan)
    core.step = step
    while core.has_unfinished():          # what the failed step left
        core.step()
    for core, _, _ in built:
        core.check_blocks()


def test_overlap_ratios_split_a_fleets_steps_by_company():
    """served.overlap_ratios: a fleet's real steps against a profile, those alone apart from those beside
    another replica's step."""
    from kvflow.sim.cost_model import roofline_profile
    from kvflow.sim.served import overlap_ratios
    profile = roofline_profile("h100")
    shape = (4, 0, 800, 0.0)
    p = profile.cost_model().step_seconds(*shape)
    steps = [(shape, 1.2 * p, 0, 0.0), (shape, 1.2 * p, 1, 0.01 * p),     # both at once
             (shape, p, 0, 10 * p), (shape, p, 1, 20 * p),                  # each alone
             (shape, 2.0 * p, 0, 30 * p), (shape, p, 1, 31.5 * p)]          # half overlapped: neither group
    assert overlap_ratios(profile, steps) == {"alone": 1.0, "beside": 1.2, "steps": {"alone": 2, "beside": 2}}


def test_a_fit_refitted_with_served_steps():
    """served.served_profile: the plan's steps and the served ones fitted together (a fleet's: those with
    no other replica stepping), and a fleet's co-run slowdown from its own steps beside another's over those
    alone; too few steps of either kind, or a roofline profile, are refused with the field named."""
    from kvflow.sim.served import served_profile
    truth = fixed_profile(step_s=0.004, per_token=2e-4)
    truth.params["coef"] = [0.004, 0.002, 2e-4, 0.003, 0.5]
    model = truth.cost_model()
    plan = [(s, model.step_seconds(*s)) for s in
            [(r, p, 150 * r, p * p / 2) for r in (0, 1, 4, 9) for p in (0, 24, 200) if r or p]]
    profile = dataclasses.replace(truth, params={**truth.params, "knee_tokens": []})     # the plan's exact fit
    served = [((r, 0, 120 * r, 0.0), 1.1 * model.step_seconds(r, 0, 120 * r, 0.0)) for r in (1, 2, 3)] * 20
    one = served_profile(profile, plan, served, "w")      # served decodes 10% slower than the plan's
    assert one.fit["served_over_plan_fit_decode"] == pytest.approx(1.1, rel=1e-3)
    assert one.fit["served_steps"] == 60 and one.fit["plan_steps"] == len(plan)
    assert one.cost_model().step_seconds(2, 0, 240, 0.0) == pytest.approx(1.1 * model.step_seconds(2, 0, 240, 0.0),
                                                                        rel=0.02)
    assert one.corun_slowdown == 1.0 and "fitted again with 60 steps served of w" in one.source
    t, fleet = 0.0, []             # replica 0 steps alone at the plan's times, then both at once 1.2x slower
    for shape, d in served:
        fleet.append((shape, d / 1.1, 0, t))
        t += d + 1.0
    for shape, d in served:
        fleet += [(shape, 1.2 * d / 1.1, 0, t), (shape, 1.2 * d / 1.1, 1, t)]
        t += d + 1.0
    paired = dataclasses.replace(profile, replicas_per_machine=2, corun_slowdown=1.05)
    two = served_profile(paired, plan, fleet)
    assert two.fit["served_alone_steps"] == 60
    assert two.fit["plan_corun_slowdown"] == 1.05 and two.replicas_per_machine == 2
    # a decode's figures on the fit's fixed cost (corun_part "fixed"; the pooled one for the pair not served):
    # the median served shape (two rows) beside a decode is priced as measured, 1.2x its time alone; the
    # whole-step figures stay in the fit's record
    f = 1 + 0.2 * model.step_seconds(2, 0, 240, 0.0) / 0.004
    assert two.corun_part == "fixed" and two.corun_slowdown == pytest.approx(1.2, rel=1e-3)
    assert two.corun_by_kind == {"decode": {"decode": pytest.approx(f, rel=1e-2),
                                            "prefill": pytest.approx(f, rel=1e-2)}}
    assert two.fit["served_corun_by_kind_step"] == {"decode": {"decode": pytest.approx(1.2, rel=1e-3),
                                                               "prefill": pytest.approx(1.2, rel=1e-3)}}
    assert priced_beside(two, (2, 0, 240, 0.0)) == pytest.approx(1.2, rel=2e-2)
    kept = served_profile(paired, plan, fleet[:70])        # ten steps beside: too few to measure it
    assert kept.corun_slowdown == 1.05 and "served_corun_slowdown" not in kept.fit
    t, slow = 0.0, []              # the same, with the steps alone 10% over the plan's: the fit (on relative
    for shape, d in served:        # error, with the plan's) lies between them, then is scaled to meet them
        slow.append((shape, d, 0, t))
        t += d + 1.0
    for shape, d in served:
        slow += [(shape, 1.2 * d, 0, t), (shape, 1.2 * d, 1, t)]
        t += d + 1.0
    three = served_profile(paired, plan, slow)
    assert three.fit["served_over_fit"] > 1.0     # what the fit alone left between it and the steps alone
    assert step_ratio(three, slow[:60]) == pytest.approx(1.0, rel=1e-3)      # (the 60 alone)
    assert priced_beside(three, (2, 0, 240, 0.0)) == pytest.approx(1.2, rel=2e-2)
    with pytest.raises(ValueError, match="steps"):
        served_profile(profile, plan, fleet[:5])
    with pytest.raises(ValueError, match="steps"):
        served_profile(profile, plan, fleet[60:])          # none alone
    with pytest.raises(ValueError, match="profile"):
        served_profile(roofline_profile("h100"), plan, fleet)


def priced_beside(profile, shape) -> float:
    """A step of `shape`'s price on a machine of two replicas when it starts while the other's decode is in
    progress, over its price alone."""
    machine = SharedMachine(2, profile.corun_slowdown, profile.corun_by_kind)
    a, b = (OnSharedMachine(profile.cost_model(), machine, k, lambda: 0.0) for k in range(2))
    alone = profile.cost_model().step_seconds(*shape)
    a.step_started(1.0)
    return b.step_started(alone, shape[1]) / alone


def test_a_pair_of_step_kinds_with_too_few_steps_takes_its_own_kinds_figure():
    """served.served_profile: a pair of step kinds served too seldom to measure (a prefill beside a
    decode) takes the figure of its own kind's steps beside any other, not the figure of all kinds (which the
    many decodes make: a compute-bound prefill would be priced as slowed as a memory-bound decode)."""
    from kvflow.sim.served import served_profile
    truth = fixed_profile(step_s=0.004, per_token=2e-4)
    model = truth.cost_model()
    plan = [(s, model.step_seconds(*s)) for s in [(r, p, 150 * r, p * p / 2) for r in (0, 1, 4) for p in (0, 200)
                                                  if r or p]]
    decode, prefill = (2, 0, 240, 0.0), (0, 200, 0, 20000.0)
    d, p = model.step_seconds(*decode), model.step_seconds(*prefill)
    t, fleet = 0.0, []
    for _ in range(60):            # decodes alone, then beside a decode 1.2x slower
        fleet.append((decode, d, 0, t))
        t += d + 1.0
    for _ in range(60):
        fleet += [(decode, 1.2 * d, 0, t), (decode, 1.2 * d, 1, t)]
        t += d + 1.0
    for _ in range(12):            # prefills beside a prefill (24 steps), unslowed
        fleet += [(prefill, p, 0, t), (prefill, p, 1, t)]
        t += p + 1.0
    for _ in range(10):            # prefills beside a decode as long (10: too few for the pair), unslowed
        fleet += [(prefill, p, 0, t), (decode, p, 1, t)]
        t += p + 1.0
    paired = dataclasses.replace(truth, replicas_per_machine=2)
    prof = served_profile(paired, plan, fleet)
    assert prof.corun_slowdown > 1.2        # all kinds (time-weighted: the decodes', and the long ones beside prefills)
    assert prof.fit["served_prefill_beside_decode_steps"] == 10 and prof.fit["served_prefill_beside_steps"] == 34
    assert prof.corun_by_kind["prefill"] == {"prefill": pytest.approx(1.0, rel=1e-3),
                                             "decode": pytest.approx(1.0, rel=1e-3)}    # its own kind's figure
    assert prof.fit["served_corun_by_kind_step"]["decode"]["decode"] == pytest.approx(1.2, rel=1e-3)
    assert prof.corun_part == "fixed" and priced_beside(prof, decode) == pytest.approx(1.2, rel=2e-2)
    assert priced_beside(prof, prefill) == pytest.approx(1.0, rel=1e-3)


def test_a_fleets_served_fit_meets_its_steps_total_time_not_their_median():
    """A step's time on a shared CPU has a long right tail, and a request's TPOT is the mean of its steps': a
    fleet's served fit is scaled so that its steps alone add up to their measured total (time_ratio), not to
    their median (step_ratio), and its co-run figures price the steps beside another's at their total too."""
    from kvflow.sim.served import served_profile
    from kvflow.sim.cost_model import time_ratio
    truth = fixed_profile(step_s=0.004, per_token=2e-4)
    model = truth.cost_model()
    plan = [(s, model.step_seconds(*s)) for s in [(r, p, 150 * r, p * p / 2) for r in (0, 1, 4) for p in (0, 200)
                                                  if r or p]]
    decode = (2, 0, 240, 0.0)
    d = model.step_seconds(*decode)
    t, fleet = 0.0, []
    for k in range(60):            # alone: one step in six twice as long
        fleet.append((decode, 2 * d if k % 6 == 0 else d, 0, t))
        t += 3 * d + 1.0
    for k in range(60):            # beside a decode: 1.2x those
        fleet += [(decode, 1.2 * (2 * d if k % 6 == 0 else d), i, t) for i in (0, 1)]
        t += 3 * d + 1.0
    prof = served_profile(dataclasses.replace(truth, replicas_per_machine=2), plan, fleet)
    assert time_ratio(prof, fleet[:60]) == pytest.approx(1.0, rel=1e-3)
    assert step_ratio(prof, fleet[:60]) < 0.9              # the median step is priced above its time
    assert prof.cost_model().step_seconds(*decode) == pytest.approx(7 / 6 * d, rel=1e-3)
    assert priced_beside(prof, decode) == pytest.approx(1.2, rel=1e-3)
