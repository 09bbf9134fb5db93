"""Scheduling policies, presets and the SLO-aware budget without a model: the real `Scheduler` and
`KVCacheManager` driven through the step contract (the Harness of test_scheduler.py, which asserts the block
invariant after every step). One end-to-end test on a tiny model checks that greedy outputs do not depend
on the policy or the preset."""
import pytest

from kvflow.config import EngineConfig
from kvflow.predict.base import LengthEstimate
from kvflow.presets import PRESETS
from kvflow.request import Request, RequestStatus
from kvflow.sampling.params import SamplingParams
from kvflow.scheduler.costs import StepTimeModel
from kvflow.scheduler.policy import POLICY_MODULES, make_policy
from tests.test_scheduler import BS, Harness


def harness(policy, **kw) -> Harness:
    h = Harness(**kw)
    h.sched.policy = make_policy(policy) if isinstance(policy, str) else policy
    h.sched.policy.bind(h.sched)
    return h


def add(h, rid, prompt_len=3, max_tokens=4, priority=0, client=None, predicted=None, first=100):
    req = Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens), {2},
                  max_tokens, arrival_time=h.clock(), priority=priority, client=client,
                  length_estimate=None if predicted is None else LengthEstimate.point(predicted))
    h.sched.add_request(req)
    return req


def finish_order(h, **kw) -> list[str]:
    order = []
    while h.sched.has_unfinished():
        _, outs = h.step(**kw)
        order += [o.request_id for o in outs if o.finish_reason]
    h.run()
    return order


def test_every_policy_is_registered_and_offered():
    assert set(POLICY_MODULES) == {"fcfs", "priority", "sjf", "mlfq", "cache-aware", "fair"}
    for name in POLICY_MODULES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_policy("lottery")


def test_priority_orders_waiting_and_takes_the_seat_of_a_lower_priority_request():
    h = harness("priority", max_seqs=1)
    add(h, "low", priority=5, max_tokens=6)
    h.step()                                          # low runs alone
    add(h, "mid", priority=1)
    add(h, "high", priority=0)
    add(h, "high2", priority=0)                        # same priority: arrival order
    order = finish_order(h)
    assert order == ["high", "high2", "mid", "low"]
    assert h.sched.num_displaced == 1 and h.outputs["low"] == [7] * 6   # resumed, nothing lost or repeated


def test_priority_victim_is_the_lowest_priority_when_memory_runs_out():
    h = harness("priority", num_blocks=6, budget=64, max_seqs=8)
    add(h, "a", prompt_len=8, max_tokens=8, priority=0)
    add(h, "b", prompt_len=8, max_tokens=8, priority=9, first=300)
    add(h, "c", prompt_len=8, max_tokens=8, priority=1, first=500)
    preempted = []
    while h.sched.has_unfinished():
        h.step()
        preempted += [r.request_id for r in h.sched.waiting if r.status == RequestStatus.PREEMPTED]
    h.run()
    assert preempted and preempted[0] == "b"
    assert all(len(h.outputs[r]) == 8 for r in "abc")


def test_sjf_runs_the_shortest_predicted_first_and_aging_bounds_starvation():
    h = harness("sjf", max_seqs=1)
    add(h, "long", predicted=200, max_tokens=40)
    add(h, "short", predicted=3, max_tokens=3)
    add(h, "mid", predicted=20, max_tokens=5)
    assert finish_order(h) == ["short", "mid", "long"]
    # aging: a long request that has waited outranks a newer short one
    h = harness("sjf", max_seqs=1, num_blocks=32)
    pol = h.sched.policy
    old = add(h, "old", predicted=64, max_tokens=64)
    h.clock.t += 100                                   # it has waited 100 s: 64 - 8 * 100 < 0
    new = add(h, "new", predicted=2, max_tokens=2)
    now = h.clock()
    assert pol.rank(old, now) < pol.rank(new, now)
    h.run()


def test_sjf_reestimates_the_remaining_length_as_tokens_are_generated():
    est = LengthEstimate([0.5, 0, 0, 0, 0, 0.5, 0, 0, 0, 0])     # 1-16 or 256-512 tokens
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=1000), {2}, 1000, length_estimate=est)
    before = req.predicted_remaining()
    for _ in range(20):
        req.append_token(5)
    assert before < 300 < req.predicted_remaining()   # past 16 tokens it can only be the long kind


def test_mlfq_skip_join_demotion_promotion_and_queue_lengths():
    h = harness("mlfq", max_seqs=1)
    pol = h.sched.policy
    short = add(h, "short", predicted=4, max_tokens=40)
    long = add(h, "long", predicted=400, max_tokens=40)                # costs 40 (max_tokens): quantum 64
    assert pol.level(short) == 0 and pol.level(long) == 2          # skip-join by predicted cost
    assert pol.queue_lengths()["0"] == 1 and pol.queue_lengths()["2"] == 1
    for _ in range(18):                                             # short's quantum at level 0 is 16 tokens
        h.step()
    assert pol.level(short) == 1                                    # demoted after its quantum
    # a request that waits STARVATION_S at its level is promoted to level 0
    h.clock.t += pol.starvation_s + 1
    h.sched.policy.order_waiting(h.sched.waiting, h.clock())
    assert pol.level(long) == 0
    h.run()
    assert pol.queue_lengths() == {str(i): 0 for i in range(pol.levels)}


def test_mlfq_new_short_request_preempts_a_demoted_one():
    h = harness("mlfq", max_seqs=1)
    add(h, "a", predicted=4, max_tokens=60)
    for _ in range(40):                                # a is demoted past level 0
        h.step()
    add(h, "b", predicted=2, max_tokens=2)
    order = finish_order(h)
    assert order == ["b", "a"] and h.sched.num_displaced == 1 and len(h.outputs["a"]) == 60


def test_cache_aware_serves_longest_prefix_first_without_starving():
    h = harness("cache-aware", max_seqs=1, num_blocks=32, budget=64)
    add(h, "warm", prompt_len=12, max_tokens=1)      # caches blocks of tokens 100..111
    h.run()
    h.sched.policy.max_wait_s = 50.0
    add(h, "cold", prompt_len=12, max_tokens=1, first=500)
    add(h, "hit", prompt_len=12, max_tokens=1)        # same prompt as warm: 2 cached blocks
    assert finish_order(h) == ["hit", "cold"]
    # past max_wait_s a request goes first whatever its hits
    add(h, "cold2", prompt_len=12, max_tokens=1, first=700)
    h.clock.t += 100
    add(h, "hit2", prompt_len=12, max_tokens=1)
    assert finish_order(h) == ["cold2", "hit2"]


def test_fair_serves_the_quiet_client_before_the_flooders_backlog():
    h = harness("fair", max_seqs=1)
    for i in range(6):
        add(h, f"flood{i}", client="flood", max_tokens=4, first=100 + 10 * i)
    for _ in range(12):                                # flood runs, its counter grows
        h.step()
    add(h, "quiet", client="quiet", max_tokens=4, first=900)
    order = finish_order(h)
    flood_left = [r for r in order if r.startswith("flood")]
    assert order.index("quiet") <= 1, order           # at most the one running flood request first
    assert len(flood_left) + 1 == len(order)
    pol = h.sched.policy
    assert pol.counters["quiet"] > 0 and pol.counters["flood"] > pol.counters["quiet"]


def test_fair_lifts_a_returning_clients_counter_and_applies_weights():
    pol = make_policy("fair", client_weights="gold=2")
    h = harness(pol, max_seqs=4)
    add(h, "a", client="busy", max_tokens=4)
    h.run()
    add(h, "b", client="busy", max_tokens=8)
    h.step()
    add(h, "c", client="new", max_tokens=1)          # joins one margin below the smallest active counter
    assert pol.counters["new"] == pytest.approx(max(0.0, pol.counters["busy"] - pol.margin))
    h.run()
    before = dict(pol.counters)
    add(h, "g", client="gold", prompt_len=4, max_tokens=1)
    add(h, "p", client="plain", prompt_len=4, max_tokens=1)
    h.run()
    assert pol.counters["gold"] - before.get("gold", 0) < pol.counters["plain"] - before.get("plain", 0)
    with pytest.raises(ValueError, match="client_weights"):
        EngineConfig.from_kwargs(client_weights="gold=-1")


def test_static_reservation_allocates_the_whole_length_and_never_preempts():
    h = Harness(num_blocks=8, budget=64, max_seqs=8)
    h.sched.static_reservation = True
    add(h, "a", prompt_len=5, max_tokens=11)          # 16 tokens: 4 blocks at once
    add(h, "b", prompt_len=5, max_tokens=11, first=300)
    add(h, "c", prompt_len=5, max_tokens=11, first=500)   # no room left: waits for a's blocks
    h.step()
    assert len(h.kv.table("a")) == 4 and len(h.kv.table("b")) == 4 and h.kv.table("c") == []
    h.run()
    assert h.sched.num_preemptions == 0 and all(len(h.outputs[r]) == 11 for r in "abc")


def test_without_chunked_prefill_a_prompt_is_computed_whole():
    h = Harness(budget=8, max_seqs=8, num_blocks=32)
    h.sched.enable_chunked_prefill = False
    h.sched.max_num_batched_tokens = 32               # what the scheduler sets: at least max_model_len
    add(h, "a", prompt_len=20)
    add(h, "b", prompt_len=20, first=300)
    out, _ = h.step()
    assert [(s.req_id, s.num_new_tokens) for s in out.rows()] == [("a", 20)]   # b does not fit the rest
    h.run()


def test_async_recovery_copies_back_beside_a_step_and_computes_the_step_after():
    h = Harness(num_blocks=6, budget=64, max_seqs=8, swap=16, mode="swap")
    h.sched.async_recovery = True
    add(h, "a", prompt_len=8, max_tokens=8)
    add(h, "b", prompt_len=8, max_tokens=8, first=300)
    kinds, recovering = [], []
    while h.sched.has_unfinished():
        out, _ = h.step()
        kinds += [op.kind for op in out.block_ops]
        if h.sched._recovering:
            recovering.append(set(h.sched._recovering))
            assert not any(s.req_id in h.sched._recovering for s in out.rows())   # not computed while copying
    h.run()
    assert "swap_out" in kinds and "swap_in_async" in kinds and "swap_in" not in kinds and recovering
    assert h.outputs["a"] == [7] * 8 and h.outputs["b"] == [7] * 8


def test_step_time_model_and_the_slo_budget():
    m = StepTimeModel()
    assert m.prefill_budget(4, 400, 0.05, 2048, 16) == 2048           # not trusted yet: the fixed budget
    for rows in range(1, 9):
        for prefill in (0, 64, 256, 1024):
            for ctx in (10, 800, 3000):
                m.observe(rows, prefill, ctx, 0.004 + 0.001 * rows + 0.00005 * prefill + 1e-6 * ctx)
    assert m.predict(4, 1000, 400) == pytest.approx(0.004 + 0.004 + 0.05 + 0.0004, rel=0.02)
    budget = m.prefill_budget(4, 400, 0.03, 2048, 16)
    assert 420 <= budget <= 440                         # (0.03 - 0.0084) / 5e-5 = 432
    assert m.prefill_budget(4, 400, 0.001, 2048, 16) == 16   # never below the minimum chunk
    # a chunk deep into its prompt attends to more tokens: fewer fit (the model learned no such cost here,
    # so the budget is unchanged; with one it shrinks)
    assert m.prefill_budget(4, 400, 0.03, 2048, 16, prefill_start=2000) <= budget
    noisy = StepTimeModel()
    noisy.xtx, noisy.xty, noisy.num_steps = m.xtx.copy(), m.xty.copy(), m.num_steps
    for i in range(200):                               # measured times scatter +-30% around the model
        noisy.observe(4, 256, 400, (0.004 + 0.004 + 0.0128 + 0.0004) * (1.3 if i % 2 else 0.7))
    assert noisy.ratio_var > 0.05 and noisy.prefill_budget(4, 400, 0.03, 2048, 16) < 0.8 * budget
    h = Harness(budget=512, max_seqs=8, num_blocks=128)
    h.sched.tpot_slo_s = 0.01
    h.sched.step_time = m
    add(h, "d", prompt_len=3, max_tokens=20)
    h.step()                                           # d decodes from now on
    add(h, "p", prompt_len=200, max_tokens=2, first=300)
    out, _ = h.step()
    assert out.rows()[0].req_id == "d"              # decodes first
    assert 1 + 95 <= out.num_scheduled_tokens <= 1 + 100   # (0.01 - 0.005) / 5e-5 prefill tokens
    h.run()


def test_presets_set_what_the_survey_table_says():
    orca = EngineConfig.from_kwargs(preset="orca").scheduler
    assert (orca.kv_reservation, orca.enable_chunked_prefill, orca.scheduling_policy) == ("static", False, "fcfs")
    sglang = EngineConfig.from_kwargs(preset="sglang")
    assert sglang.scheduler.scheduling_policy == "cache-aware" and sglang.scheduler.preemption_mode == "recompute"
    assert sglang.cache.enable_prefix_caching
    fast = EngineConfig.from_kwargs(preset="fastserve").scheduler
    assert (fast.scheduling_policy, fast.preemption_mode, fast.async_recovery) == ("mlfq", "swap", True)
    assert EngineConfig.from_kwargs(preset="sarathi").scheduler.max_num_batched_tokens == 512
    assert not EngineConfig.from_kwargs(preset="vllm").cache.enable_prefix_caching
    over = EngineConfig.from_kwargs(preset="sglang", scheduling_policy="fcfs")     # explicit wins
    assert over.scheduler.scheduling_policy == "fcfs" and over.preset == "sglang"
    assert EngineConfig.from_dict(over.to_dict()) == over
    with pytest.raises(ValueError, match="preset must be one of"):
        EngineConfig.from_kwargs(preset="tgi")
    assert set(PRESETS) >= {"orca", "vllm", "sarathi", "sglang", "fastserve", "kvflow"}


def test_cli_preset_keeps_only_explicit_flags(capsys):
    from kvflow.entrypoints.cli import make_parser
    from kvflow.entrypoints.cli_args import engine_kwargs
    args = make_parser().parse_args(["generate", "x", "--preset", "fastserve", "--preemption-mode", "auto"])
    assert engine_kwargs(args) == {"preset": "fastserve", "preemption_mode": "auto"}
    with pytest.raises(SystemExit):
        make_parser().parse_args(["generate", "x", "--preset", "nope"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("bad, match", [
    (dict(scheduling_policy="lottery"), "scheduling_policy"), (dict(tpot_slo_ms=-5), "tpot_slo_ms"),
    (dict(kv_reservation="greedy"), "kv_reservation"), (dict(client_weights="x"), "client_weights")])
def test_bad_scheduling_options_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_kwargs(**bad)


# ---- end to end on a tiny model ------------------------------------------------------------------------

def test_greedy_outputs_do_not_depend_on_the_policy_or_preset(tiny_model_dir):
    from kvflow import LLM
    from tests.conftest import random_prompts
    model = tiny_model_dir("llama_gqa")
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 40, 17, 3, 60, 9], seed=7)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = None
    # the presets of one engine (the P/D presets run on Ray workers: tests/test_disagg.py; deepflow is a
    # serving shape: tests/test_serverless.py)
    local = [p for p in PRESETS if not (c := EngineConfig.from_kwargs(preset=p)).distributed
             and not c.serverless.serverless]
    assert {"orca", "vllm", "sarathi", "sglang", "fastserve", "kvflow"} <= set(local)
    configs = [{"scheduling_policy": p} for p in POLICY_MODULES] + [{"preset": p} for p in local]
    configs.append({"preset": "fastserve", "num_kv_blocks": 10})     # preempted by swap, recovered async
    for kw in configs:
        llm = LLM(model=model, dtype="float32", block_size=8, **{"max_num_seqs": 2, "num_kv_blocks": 24, **kw})
        prio = [3, 1, 2, 0, 1, 2] if kw.get("scheduling_policy") == "priority" else None
        outs = llm.generate(prompts, greedy, use_tqdm=False, priority=prio, user=["a", "b", "a", "a", "b", "a"])
        ids = [o.outputs[0].token_ids for o in outs]
        ref = ref or ids
        assert ids == ref, kw
    assert llm.engine.core.scheduler.num_swapped_out > 0
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.generate(prompts[:1], greedy, priority=["high"])
    with pytest.raises(ValueError, match="only honoured with scheduling_policy='priority'"):
        llm.generate(prompts[:1], greedy, priority=[1])
    with pytest.raises(ValueError, match="priority has 2 entries"):
        llm.generate(prompts[:1], greedy, priority=[1, 2])


def test_a_bad_predictor_file_is_refused_before_the_engine_starts(tiny_model_dir, tmp_path):
    from kvflow.config import resolve
    model = tiny_model_dir("llama_gqa")
    with pytest.raises(FileNotFoundError, match="length predictor file not found"):
        resolve(EngineConfig.from_kwargs(model=model, length_predictor=str(tmp_path / "none.npz")))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a kvflow length predictor file"):
        resolve(EngineConfig.from_kwargs(model=model, length_predictor=str(junk)))
