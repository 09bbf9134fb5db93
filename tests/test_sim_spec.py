"""Speculative decoding in the simulator (kvflow/sim/runner.py, kvflow/sim/replica.py): the real scheduler's
speculation path (SpecController, lookahead slots, rollback of rejected drafts) against the simulated
runner's drafts and verifications. Fewer steps at high acceptance, as many at none; every request gets
exactly its tokens; deterministic; every block comes back; and the same steps as the real engine."""
import json

import pytest

from kvflow.config import EngineConfig
from kvflow.sim.cluster import Simulation
from kvflow.sim.cost_model import HardwareProfile, load_profile
from kvflow.sim.replica import SimReplica, engine_spec
from kvflow.sim.runner import SimRunner, draw
from kvflow.sim.workload import parse_workload, workload_requests

from .conftest import needs_default_model
from .test_sim import all_blocks_back, clocked_step, fixed_profile

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4}'
NGRAM_FIXED = '{"method": "ngram", "num_speculative_tokens": 4, "adaptive": false}'   # always 4 drafts
LAYER_SKIP = '{"method": "layer_skip", "num_speculative_tokens": 3, "adaptive": false}'


def run(spec: str | None, acceptance, workload: str = "chat:n=40,rate=20,seed=4", propose_rate: float = 1.0,
        **kw):
    """One simulated replica (h100 profile) with speculation at `acceptance` (one figure, or one per draft
    position), drafts given to `propose_rate` of the asks: (simulation, recorder, steps)."""
    config = EngineConfig.from_kwargs(speculative_config=spec, num_kv_blocks=kw.pop("num_kv_blocks", 2048), **kw)
    sim = Simulation(config, load_profile("h100"), spec_acceptance=acceptance, spec_propose_rate=propose_rate)
    rec = sim.run(workload_requests(parse_workload(workload)))
    all_blocks_back(sim)
    return sim, rec, sum(r.runner.num_steps for r in sim.replicas())


def test_speculation_saves_steps_at_high_acceptance_and_backs_off_at_none():
    _, plain, steps = run(None, 0.7)
    want = sorted(r[2] for r in plain.rows)
    for acceptance, lo, hi in ((0.9, 0.3, 0.75), (0.0, 0.97, 1.03)):
        sim, rec, n = run(NGRAM, acceptance)
        assert lo * steps <= n <= hi * steps, (acceptance, n, steps)
        assert sorted(r[2] for r in rec.rows) == want          # every request: exactly its max_tokens
        spec = sim.replicas()[0].scheduler.spec
        assert spec.num_verifications > 0
        if acceptance == 0.0:
            assert spec.num_accepted == 0 and spec.num_verifications < 0.1 * steps   # paused: few tries


def test_lookahead_under_memory_pressure_and_determinism():
    """layer_skip writes its drafts' KV (lookahead slots); a tight cache preempts; twice the same result."""
    first = run(LAYER_SKIP, 0.6, "random:n=30,rate=50,input=100,output=60,seed=2", num_kv_blocks=40)
    again = run(LAYER_SKIP, 0.6, "random:n=30,rate=50,input=100,output=60,seed=2", num_kv_blocks=40)
    assert first[1].rows == again[1].rows and first[2] == again[2]
    sched = first[0].replicas()[0].scheduler
    assert sched.num_preemptions > 0 and sched.spec.num_accepted > 0
    assert all(r[2] == 60 for r in first[1].rows)


def test_runner_drafts_and_verifies_by_the_contract():
    """The runner verifies the drafts it proposed (as the scheduler kept them), returns the accepted ones and
    one token, drafts as many as asked, a leading run at the acceptance rate; the proposer's time is inside
    the step's."""
    config = EngineConfig.from_kwargs(speculative_config=LAYER_SKIP, num_kv_blocks=64)
    now = [0.0]
    rep = SimReplica(0, engine_spec(config, fixed_profile()), fixed_profile().cost_model(), lambda: now[0],
                     track_tables=True, spec_acceptance=0.5)
    for i in range(4):
        rep.add(f"q{i}", list(range(1 + i, 40 + i)), 200, 0.0)
    proposed = {}
    while rep.has_work():
        seconds = rep.begin_step()
        sched, result, _ = rep._step
        for s, toks in zip(sched.rows(), result.sampled_token_ids):
            drafts = s.token_ids[len(s.token_ids) - s.num_spec_tokens:]
            assert drafts == proposed.pop(s.req_id, [])[:s.num_spec_tokens]   # what it drafted, maybe cut
            assert s.sample or not drafts
            assert bool(toks) == s.sample and len(toks) <= len(drafts) + 1
            assert toks[:-1] == drafts[:len(toks) - 1]                        # accepted drafts, then one token
            assert rep.runner.tables[s.req_id] == rep.kv.block_ids(s.req_id)
        assert {r: len(d) for r, d in result.draft_token_ids.items()} == \
            {s.req_id: s.num_draft_tokens for s in sched.rows() if s.num_draft_tokens}
        assert 0 < result.draft_seconds < seconds if result.draft_tokens else result.draft_seconds == 0
        proposed.update(result.draft_token_ids)
        now[0] += seconds
        rep.end_step()
        for rid, d in list(proposed.items()):      # what the scheduler keeps to verify (within max_tokens)
            proposed[rid] = rep.scheduler.requests[rid].spec_token_ids if rid in rep.scheduler.requests else []
    spec = rep.scheduler.spec
    # a leading run, each draft at 0.5: 0.5 + 0.25 + 0.125 accepted per verification of 3
    assert 0.75 < spec.mean_accepted < 1.0 and rep.scheduler.step_time.ready
    rep.check()
    assert 0.68 < sum(draw(7, p) < 0.7 for p in range(5000)) / 5000 < 0.72
    with pytest.raises(ValueError, match="spec_acceptance"):
        SimRunner(fixed_profile().cost_model(), spec_acceptance=1.5)


@needs_default_model
@pytest.mark.slow
@pytest.mark.parametrize("acceptance", [0.0, 1.0])
def test_sim_takes_the_real_engines_steps_under_speculation(default_model_path, acceptance):
    """The real EngineCore (the default model, greedy, ignore_eos) with its proposer replaced by one whose
    drafts are all wrong (a token the greedy outputs never hold) or all right (the greedy outputs of a run
    without speculation), and the simulated replica at acceptance 0 or 1, schedule the same requests,
    tokens, proposals and drafts in the same steps: lookahead slots in a tight cache, preemption, the
    rollback of rejected proposals, bonus tokens. Non-adaptive: the controller's batch rule reads measured
    step times, which no simulation reproduces."""
    import torch

    from kvflow.engine.core import EngineCore
    from kvflow.engine.input_processor import open_model
    from kvflow.engine.wire import EngineCoreRequest
    from kvflow.sampling.params import SamplingParams
    opts = dict(num_kv_blocks=7, max_num_seqs=4, max_num_batched_tokens=48, preemption_mode="recompute",
                num_threads=2)
    prompts = [[7 + (i * 13 + j) % 900 for j in range(n)] for i, n in enumerate((20, 35, 50, 12, 70, 28))]
    prompts[3] = prompts[1][:16] + prompts[3]                   # a shared prefix: a prefix-cache hit
    max_tokens = [6, 9, 5, 8, 7, 10]
    wrong = 48_000

    def log_steps(scheduler, step):
        steps, outputs = [], {}
        orig = scheduler.schedule

        def schedule():
            out = orig()
            if out.rows():
                steps.append([(s.req_id, s.num_computed_tokens, len(s.token_ids), s.sample, s.num_spec_tokens,
                               s.num_draft_tokens) for s in out.rows()])
            return out
        scheduler.schedule = schedule
        while scheduler.has_unfinished():
            for o in step() or []:
                outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
        return steps, outputs

    def real_run(spec, proposer=None):
        config = EngineConfig.from_kwargs(**opts, speculative_config=spec)
        rc, reader, _ = open_model(config)
        core = EngineCore.build(rc, reader)
        if proposer is not None:
            core.runner.proposer = proposer
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            core.add_request(EngineCoreRequest(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=True,
                                                                          temperature=0.0), [], m, 0.0))
        with torch.inference_mode():
            steps, outputs = log_steps(core.scheduler, core.step)
        core.check_blocks()
        return core, steps, outputs

    greedy = real_run(None)[2] if acceptance else None

    class Proposer:                     # the real runner's proposer, replaced: every draft wrong, or right
        def propose(self, requests):
            if greedy is None:
                return [[wrong] * r.num_tokens for r in requests]
            done = [len(r.token_ids) - len(prompts[int(r.req_id[1:])]) for r in requests]
            return [greedy[r.req_id][n:n + r.num_tokens] for r, n in zip(requests, done)]

        def forget(self, req_id):
            pass

    core, real, outputs = real_run(LAYER_SKIP, Proposer())
    assert greedy is None or outputs == greedy
    assert all(wrong not in o for o in outputs.values())

    now = [0.0]
    rep = SimReplica(0, engine_spec(EngineConfig.from_kwargs(**opts, speculative_config=LAYER_SKIP),
                                    fixed_profile()), fixed_profile().cost_model(), lambda: now[0],
                     spec_acceptance=acceptance)
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        rep.add(f"r{i}", p, m, 0.0)

    simulated = log_steps(rep.scheduler, clocked_step(rep, now))[0]
    rep.check()
    assert simulated == real
    sim_spec, real_spec = rep.scheduler.spec, core.scheduler.spec
    assert real_spec.num_verifications > 0 and real_spec.num_accepted == (real_spec.num_proposed if acceptance else 0)
    assert (sim_spec.num_verifications, sim_spec.num_proposed, sim_spec.num_accepted) == \
        (real_spec.num_verifications, real_spec.num_proposed, real_spec.num_accepted)
    assert rep.scheduler.num_preemptions == core.scheduler.num_preemptions
    assert rep.kv.num_hits == core.kv.num_hits > 0
    if not acceptance:
        assert core.scheduler.num_preemptions > 0


def test_the_simulation_takes_the_profiles_measured_acceptance():
    """HardwareProfile.spec_acceptance (measured by a served calibration): the simulation's chance per draft
    when it is not given one; a given one wins; neither: runner.DEFAULT_ACCEPTANCE. Out of [0, 1] it is refused
    with the field named."""
    import dataclasses

    from kvflow.sim.runner import DEFAULT_ACCEPTANCE
    config = EngineConfig.from_kwargs(speculative_config=NGRAM, num_kv_blocks=2048)
    plain = load_profile("h100")
    measured = dataclasses.replace(plain, spec_acceptance=1.0)
    assert plain.spec_acceptance is None and Simulation(config, plain).spec_acceptance == DEFAULT_ACCEPTANCE
    sim = Simulation(config, measured)
    assert sim.spec_acceptance == 1.0 and all(r.runner.acceptance == (1.0,) for r in sim.replicas())
    assert Simulation(config, measured, spec_acceptance=0.25).spec_acceptance == 0.25
    steps = {}
    for name, profile in (("measured", measured), ("none", dataclasses.replace(plain, spec_acceptance=0.0))):
        sim = Simulation(config, profile)
        sim.run(workload_requests(parse_workload("chat:n=40,rate=20,seed=4")))
        all_blocks_back(sim)
        steps[name] = sum(r.runner.num_steps for r in sim.replicas())
    assert steps["measured"] < 0.5 * steps["none"]          # every draft accepted: far fewer steps
    for bad in (1.5, -0.1, "0.7", [], [0.5, 1.2], True):
        with pytest.raises(ValueError, match="spec_acceptance"):
            dataclasses.replace(plain, spec_acceptance=bad)
        if not isinstance(bad, list):
            with pytest.raises(ValueError, match="spec_propose_rate"):
                dataclasses.replace(plain, spec_propose_rate=bad)
    assert Simulation(config, dataclasses.replace(plain, spec_propose_rate=0.25)).spec_propose_rate == 0.25
    assert Simulation(config, plain).spec_propose_rate == 1.0
    by_position = dataclasses.replace(plain, spec_acceptance=[0.3, 0.9])
    assert HardwareProfile(**json.loads(by_position.to_json())).spec_acceptance == [0.3, 0.9]
    assert all(r.runner.acceptance == (0.3, 0.9) for r in Simulation(config, by_position).replicas())


def test_acceptance_by_draft_position():
    """spec_acceptance per draft position: each position's drafts are accepted at its own chance, given that the
    ones before it were (the last figure holds after it), as the served calibration measures them; the measured
    figures give the same run back, position by position, through the real SpecController's counters."""
    from kvflow.sim.served import measured_acceptance
    given = [0.3, 0.9, 0.6]
    sim, rec, n = run(NGRAM_FIXED, given, workload="random:n=300,rate=inf,input=64,output=64,seed=2")
    specs = [r.scheduler.spec for r in sim.replicas()]
    tried = [sum(s.tried_at[i] for s in specs) for i in range(4)]
    accepted = [sum(s.accepted_at[i] for s in specs) for i in range(4)]
    assert tried[0] > 1000 and tried[3] > 100
    for i, want in enumerate(given + [0.6]):                 # (position 4 takes the last figure)
        assert accepted[i] / tried[i] == pytest.approx(want, abs=0.05), (i, accepted, tried)
    # a position is tried only after every one before it was accepted (and not when the proposal was cut
    # shorter: a request near its max_tokens verifies fewer drafts)
    assert all(tried[i + 1] <= accepted[i] for i in range(3)) and tried[1] > 0.95 * accepted[0]
    assert sum(tried) == sum(s.num_tried for s in specs) and sum(accepted) == sum(s.num_accepted for s in specs)
    measured = measured_acceptance(accepted, tried)
    assert measured == pytest.approx(given + [0.6], abs=0.05)
    # positions tried fewer than min_tries times share the pooled figure of the rest
    assert measured_acceptance([50, 10, 1, 0], [100, 50, 10, 1], min_tries=30) == [0.5, 0.2, round(1 / 11, 4)]
    assert measured_acceptance([0, 0], [0, 0]) is None


def test_a_proposer_that_often_finds_nothing():
    """spec_propose_rate: a request asked to draft gets drafts at that chance (an n-gram proposer without a
    match gives none) and otherwise decodes plainly; the real SpecController counts the asks and the drafts
    given (observe_proposals), as a served calibration reads them. The same tokens come out either way."""
    workload = "random:n=200,rate=inf,input=64,output=48,seed=5"
    always, rec_always, steps_always = run(NGRAM_FIXED, 0.8, workload)
    sometimes, rec_sometimes, steps_sometimes = run(NGRAM_FIXED, 0.8, workload, propose_rate=0.4)
    for sim in (always, sometimes):
        spec = sim.replicas()[0].scheduler.spec
        rate = 1.0 if sim is always else 0.4
        assert spec.num_asked > 2000 and spec.num_offered / spec.num_asked == pytest.approx(rate, abs=0.04)
        assert spec.num_offered_tokens == 4 * spec.num_offered
        assert spec.num_verifications <= spec.num_offered      # (a request that ends has its drafts dropped)
    assert steps_always < 0.8 * steps_sometimes
    assert [r.output_tokens for r in rec_always.results()] == [r.output_tokens for r in rec_sometimes.results()]
    with pytest.raises(ValueError, match="spec_propose_rate"):
        SimRunner(fixed_profile().cost_model(), spec_propose_rate=1.5)


def test_each_request_its_own_proposal_rate():
    """spec_propose_rate as a list (a served calibration's requests' own shares, by quantile): each simulated
    request takes one of them for its life, so a request either always drafts or never does here, where one
    rate for all gives every request about the same share; the real SpecController's histogram of the ended
    requests' shares tells them apart, and request_quantiles reads the list back from it."""
    from kvflow.sim.served import request_quantiles
    workload = "random:n=200,rate=inf,input=64,output=48,seed=5"
    own, rec_own, _ = run(NGRAM_FIXED, 0.8, workload, propose_rate=[0.0, 1.0])
    same, rec_same, _ = run(NGRAM_FIXED, 0.8, workload, propose_rate=0.5)
    by_bin = own.replicas()[0].scheduler.spec.propose_bin_requests
    assert sum(by_bin) == 200 and by_bin[0] + by_bin[-1] == 200 and 70 < by_bin[0] < 130, by_bin
    assert request_quantiles(by_bin, own.replicas()[0].scheduler.spec.propose_bin_rates, n=4) == [0.0, 0.0, 1.0, 1.0]
    spread = same.replicas()[0].scheduler.spec.propose_bin_requests
    assert sum(spread) == 200 and spread[0] + spread[-1] < 10 and sum(spread[7:13]) > 120, spread
    assert [r.output_tokens for r in rec_own.results()] == [r.output_tokens for r in rec_same.results()]
    with pytest.raises(ValueError, match="spec_propose_rate"):
        SimRunner(fixed_profile().cost_model(), spec_propose_rate=[0.5, -1])
    with pytest.raises(ValueError, match="spec_propose_rate"):
        SimRunner(fixed_profile().cost_model(), spec_propose_rate=[])


def test_observe_proposals_counts_asks_and_drafts():
    from kvflow.sim.served import request_quantiles
    from kvflow.spec.adaptive import PROPOSE_BINS, SpecController
    from kvflow.spec.config import SpeculativeConfig
    c = SpecController(SpeculativeConfig.parse(NGRAM))
    c.observe_proposals({"a": 4, "b": 4, "c": 2}, {"a": [1, 2, 3], "c": [], "z": [9]})
    assert (c.num_asked, c.num_offered, c.num_offered_tokens) == (3, 1, 3)
    c.observe_proposals({"a": 4, "b": 4}, {"a": [5], "b": [1]})
    for rid in ("a", "b", "c", "never-asked"):       # ended: a 2 of 2, b 1 of 2, c 0 of 1
        c.forget(rid)
    want = [0] * PROPOSE_BINS
    want[0] = want[PROPOSE_BINS // 2] = want[-1] = 1
    assert c.propose_bin_requests == want and sum(c.propose_bin_rates) == 1.5 and not c._proposals
    assert request_quantiles(c.propose_bin_requests, c.propose_bin_rates, n=3) == [0.0, 0.5, 1.0]
    assert request_quantiles([0] * PROPOSE_BINS, [0.0] * PROPOSE_BINS) is None


@pytest.mark.slow
def test_a_served_calibration_measures_the_drafts_acceptance(tiny_model_dir, monkeypatch):
    """`kvflow sim calibrate --workload W --speculative-config ...` (calibrate, served.fit_served): the profile's
    spec_acceptance is the served run's drafts accepted per draft position tried (not the plan's), read from the
    real engine's SpecController. A tiny model (its greedy answers repeat themselves: the n-gram proposer finds
    matches)."""
    from kvflow.sim import calibrate as cal
    from kvflow.sim import served
    monkeypatch.setattr(cal, "SWEEP", (32, 33))
    kwargs = {"model": tiny_model_dir("llama_gqa"), "num_threads": 1, "max_num_seqs": 8, "speculative_config": NGRAM}
    built = cal.build_core(kwargs)
    spec = built[0].scheduler.spec
    seen = []
    fit_served = served.fit_served

    def watched(*args, **kw):        # the engine's counters when the served run starts and when it ends
        seen.append((spec.num_accepted, spec.num_tried, list(spec.accepted_at), list(spec.tried_at)))
        out = fit_served(*args, **kw)
        seen.append((spec.num_accepted, spec.num_tried, list(spec.accepted_at), list(spec.tried_at)))
        return out
    monkeypatch.setattr(served, "fit_served", watched)
    plan = ((1, 32, 12), (4, 96, 12), (1, 200, 4), (2, 64, 16))
    profile = cal.calibrate(kwargs, "spec", plan, cores=[built],
                            workload=parse_workload("random:n=16,rate=4,input=48,output=32,range=0.5,seed=3,vocab=512"))
    (a0, t0, acc0, tried0), (a1, t1, acc1, tried1) = seen
    assert t1 > t0                            # only the served run counts, not the plan before it
    assert profile.fit["served_spec_tried"] == t1 - t0 and profile.fit["served_spec_verifications"] > 0
    diff = lambda after, before: [b - a for a, b in zip(before + [0] * len(after), after)]   # noqa: E731
    tried_at = diff(tried1, tried0)
    assert profile.fit["served_spec_tried_at"] == tried_at and sum(tried_at) == t1 - t0
    assert profile.spec_acceptance == served.measured_acceptance(diff(acc1, acc0), tried_at)
    f = profile.fit
    assert 0 < f["served_spec_offered"] <= f["served_spec_asked"] and f["served_spec_offered_tokens"] > 0
    assert profile.spec_propose_rate == round(f["served_spec_offered"] / f["served_spec_asked"], 4)
    rates = f["served_spec_request_propose_rates"]          # the served requests' own shares, by quantile
    assert 0 < f["served_spec_propose_requests"] <= 16 and len(rates) == 20 and rates == sorted(rates)
    assert all(0.0 <= r <= 1.0 for r in rates)
    assert 1 <= len(profile.spec_acceptance) <= 4 and all(0.0 <= a <= 1.0 for a in profile.spec_acceptance)
    built[0].check_blocks()
