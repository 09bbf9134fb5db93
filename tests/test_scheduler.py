"""The scheduler and KV-cache manager without a model (as vLLM's tests/v1/core): the real `Scheduler` and
`KVCacheManager` driven by hand-made `RunnerOutput`s. A mirror of the runner's block tables, kept only from
the step contract, must always equal the manager's; the block invariant is asserted after every step."""
import subprocess
import sys

import pytest

from kvflow.engine.wire import decode, encode
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.memory.tiers import KVTier
from kvflow.request import Request, RequestStatus
from kvflow.sampling.params import SamplingParams
from kvflow.scheduler.policy import SchedulingPolicy
from kvflow.scheduler.scheduler import Scheduler
from kvflow.step import RunnerOutput, SchedulerOutput

BS = 4


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


class MemoryTier(KVTier):
    """A tier held in a dict, ready after `delay` fetch calls: stands in for the disk tier's reader."""
    name, save_kind, load_kind = "memory", "spill", "load"

    def __init__(self, keys=(), delay=1):
        self.keys, self.delay, self.calls, self.discarded = set(keys), delay, 0, []

    def contains(self, key):
        return key in self.keys

    def fetch(self, keys):
        self.calls += 1
        return None if self.calls <= self.delay else len(keys)

    def discard(self, keys):
        self.discarded += keys


class Harness:
    """A scheduler plus a mirror of what a runner would know, built only from SchedulerOutputs."""

    def __init__(self, num_blocks=16, budget=16, max_seqs=8, swap=0, mode="recompute", disk=None, max_len=256):
        self.kv = KVCacheManager(num_blocks, BS, True, swap, disk)
        self.clock = Clock()
        self.sched = Scheduler(self.kv, max_seqs, budget, max_len, mode, clock=self.clock)
        self.tables: dict[str, list[int]] = {}
        self.known: set[str] = set()
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}

    def add(self, rid, prompt_len, max_tokens=4, fork_from=None, first=100, **params):
        req = Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens, **params),
                      {2}, max_tokens, arrival_time=self.clock(), fork_from=fork_from)
        self.sched.add_request(req)
        return req

    def step(self, sample=lambda s: [7]) -> tuple[SchedulerOutput, list]:
        out = decode(encode(self.sched.schedule()))        # through the wire: the contract is plain data
        for rid in out.finished_req_ids:
            self.tables.pop(rid, None)
            self.known.discard(rid)
        self.known.update(n.req_id for n in out.new_requests)
        for s in out.rows():
            assert s.req_id in self.known, "scheduled before the runner was told about it"
            self.tables[s.req_id] = s.block_ids if s.blocks_replaced else self.tables[s.req_id] + s.block_ids
            assert self.tables[s.req_id] == self.kv.block_ids(s.req_id)
            assert len(self.tables[s.req_id]) * BS >= s.num_computed_tokens + s.num_new_tokens
        assert out.num_scheduled_tokens <= self.sched.max_num_batched_tokens
        result = RunnerOutput([s.req_id for s in out.rows()],
                              [sample(s) if s.sample else [] for s in out.rows()])
        outs = self.sched.update_from_output(out, result)
        for o in outs:
            self.outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                self.finished[o.request_id] = o.finish_reason
        self.sched.check()
        return out, outs

    def run(self, max_steps=200, **kw):
        steps = []
        while self.sched.has_unfinished() and len(steps) < max_steps:
            steps.append(self.step(**kw)[0])
        assert not self.sched.has_unfinished()
        self.step()                                          # hands the last finished ids to the runner
        assert self.kv.pool.num_free == self.kv.num_blocks and not self.tables
        return steps


def test_chunked_prefill_under_the_token_budget():
    h = Harness(budget=8)
    h.add("a", 20)
    h.add("b", 3)
    steps = h.run()
    work = [[(s.req_id, s.num_computed_tokens, s.num_new_tokens, s.sample) for s in o.rows()] for o in steps]
    assert work[0] == [("a", 0, 8, False)]
    assert work[1] == [("a", 8, 8, False)]
    assert work[2] == [("a", 16, 4, True), ("b", 0, 3, True)]        # b fills the budget a left
    assert work[3] == [("a", 20, 1, True), ("b", 3, 1, True)]        # decodes: one token each
    assert h.outputs == {"a": [7] * 4, "b": [7] * 4} and h.finished == {"a": "length", "b": "length"}


def test_max_num_seqs_and_stop_tokens():
    h = Harness(max_seqs=1)
    h.add("a", 5, max_tokens=10)
    h.add("b", 5)
    tokens = iter([7, 7, 2])                   # 2 is a stop id
    first, _ = h.step(sample=lambda s: [next(tokens)])
    assert [s.req_id for s in first.rows()] == ["a"]
    h.step(sample=lambda s: [next(tokens)])
    h.step(sample=lambda s: [next(tokens)])
    assert h.finished == {"a": "stop"} and h.outputs["a"] == [7, 7, 2]
    h.run()
    assert h.finished["b"] == "length"


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_loses_nothing(mode):
    h = Harness(num_blocks=8, swap=16 if mode == "swap" else 0, mode=mode)
    for i in range(3):
        h.add(f"r{i}", 8, max_tokens=12, first=100 + 10 * i)
    counter = iter(range(1000, 2000))
    kinds = []
    while h.sched.has_unfinished():
        out, _ = h.step(sample=lambda s: [next(counter)])
        kinds += [op.kind for op in out.block_ops]
        for s in out.rows():                # a resumed request is told its whole table
            req = h.sched.requests.get(s.req_id)
            if req is not None and req.num_preemptions and s.num_computed_tokens == 0:
                assert s.blocks_replaced
    h.run()
    assert h.sched.num_preemptions > 0
    assert sorted(h.finished) == ["r0", "r1", "r2"] and all(len(v) == 12 for v in h.outputs.values())
    if mode == "swap":
        assert h.sched.num_swapped_out > 0 and "swap_out" in kinds and "swap_in" in kinds
        assert h.kv.swap.num_free == 16
    else:
        assert h.sched.num_swapped_out == 0 and not kinds


def test_recompute_resends_the_generated_tokens():
    h = Harness(num_blocks=6)
    a = h.add("a", 8, max_tokens=8)
    h.step()
    h.step()                                   # a has one output token
    h.sched._preempt(h.sched.running.pop())
    out, _ = h.step()
    (s,) = out.rows()
    # its prompt blocks are still cached: it takes them, and computes its generated tokens again
    assert s.num_computed_tokens == 8 and s.token_ids == a.output_token_ids[:2] == [7, 7]
    assert s.blocks_replaced and s.sample and a.num_preemptions == 1
    h.run()


def test_prefix_hits_skip_computed_blocks():
    h = Harness()
    h.add("a", 12)
    h.run()
    b = h.add("b", 14)                          # the first 12 tokens are a's prompt: 3 cached blocks
    out, _ = h.step()
    (s,) = out.rows()
    assert b.num_cached_tokens == 12 and s.num_computed_tokens == 12 and s.token_ids == b.prompt_token_ids[12:]
    assert h.kv.num_hits == 12
    h.add("c", 12)                               # the whole prompt is cached: the last token is recomputed
    out, _ = h.step()
    assert [(s.req_id, s.num_computed_tokens, s.num_new_tokens) for s in out.rows()][-1] == ("c", 8, 4)
    h.run()


def test_disk_tier_load_does_not_block_other_work():
    from kvflow.memory.kv_cache_manager import hash_block
    keys = [hash_block(None, list(range(100, 104)))]
    keys.append(hash_block(keys[0], list(range(104, 108))))
    tier = MemoryTier(keys, delay=2)
    h = Harness(disk=tier)
    slow = h.add("slow", 10)
    h.add("other", 5, first=500)
    out, _ = h.step()
    assert [s.req_id for s in out.rows()] == ["other"] and slow.status == RequestStatus.WAITING_FOR_KV
    assert h.sched.num_loading == 1
    out, _ = h.step()
    assert [s.req_id for s in out.rows()] == ["other"]
    out, _ = h.step()                            # read: admitted from the tier, only the rest computed
    s = next(s for s in out.rows() if s.req_id == "slow")
    assert s.num_computed_tokens == 8 and s.token_ids == slow.prompt_token_ids[8:]
    (load,) = [op for op in out.block_ops if op.kind == "load"]
    assert load.src == keys and load.dst == h.kv.block_ids("slow")[:2]
    assert slow.num_cached_tokens == 8 and h.kv.num_disk_hits == 8
    h.run()


def test_abort_while_loading_running_and_waiting():
    tier = MemoryTier([], delay=10 ** 6)
    h = Harness(disk=tier)
    h.add("run", 6)
    h.step()
    tier.keys.add(h.kv.block_hashes(h.add("load", 9, first=300))[0])
    h.add("wait", 9, first=300, fork_from="load")       # waits for its source, which waits for the tier
    h.step()
    assert h.sched.requests["load"].status == RequestStatus.WAITING_FOR_KV
    assert h.sched.requests["wait"].status == RequestStatus.WAITING
    h.sched.finish_requests(["run", "wait", "load", "nobody"], RequestStatus.FINISHED_ABORTED)
    out, _ = h.step()
    assert sorted(out.finished_req_ids) == ["load", "run", "wait"] and not out.rows()
    assert tier.discarded and not h.sched.has_unfinished()
    assert h.kv.pool.num_free == h.kv.num_blocks


def test_fork_shares_the_prompt_and_copies_on_write():
    h = Harness(budget=6)
    h.add("0_r", 10, max_tokens=3)
    h.add("1_r", 10, max_tokens=3, fork_from="0_r")
    for _ in range(2):                                            # the sample waits for the prompt
        out, _ = h.step()
        assert [s.req_id for s in out.rows()] == ["0_r"]
    out, _ = h.step()
    shared = h.kv.block_ids("0_r")[:3]
    s = next(s for s in out.rows() if s.req_id == "1_r")
    assert s.num_computed_tokens == 9 and s.token_ids == [109] and s.blocks_replaced
    assert [op.kind for op in out.block_ops] == ["copy"]             # its tail block is written: a copy
    assert h.kv.block_ids("1_r")[:2] == shared[:2] and h.kv.block_ids("1_r")[2] != shared[2]
    assert h.kv.num_cow_copies == 1
    h.run()
    assert h.outputs["0_r"] == h.outputs["1_r"] == [7, 7, 7]


def test_fork_without_a_source_computes_the_prompt():
    h = Harness()
    h.add("1_r", 6, fork_from="gone")
    out, _ = h.step()
    assert out.rows()[0].num_computed_tokens == 0 and out.rows()[0].num_new_tokens == 6
    h.run()


def test_proposed_tokens_are_verified_and_rolled_back():
    h = Harness()
    req = h.add("a", 6, max_tokens=10)
    h.step()                                     # prompt: samples 7
    req.spec_token_ids = [20, 21, 22]            # a proposer's guess
    out, _ = h.step(sample=lambda s: [20, 9])    # the first is accepted, then 9 replaces 21
    (s,) = out.rows()
    assert s.token_ids == [7, 20, 21, 22] and s.num_spec_tokens == 3 and s.sample
    assert req.output_token_ids == [7, 20, 9] and req.spec_token_ids == []
    assert req.num_computed_tokens == 8 and req.num_tokens == 9          # 21 and 22 are not computed
    assert len(h.kv.table("a")) == 3                                      # room for the next token only
    req.spec_token_ids = [30, 2, 31]
    out, _ = h.step(sample=lambda s: [30, 2, 31, 32])                     # all accepted, but 2 stops it
    assert h.finished == {"a": "stop"} and req.output_token_ids == [7, 20, 9, 30, 2]
    h.run()


def test_clock_is_injected():
    h = Harness()
    req = h.add("a", 3)
    h.step()
    assert req.first_scheduled_time == 102.0 and req.arrival_time == 101.0
    h.run()
    assert req.finished_time is not None and req.finished_time > req.first_scheduled_time


def test_core_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import kvflow.request, kvflow.scheduler.scheduler, kvflow.memory.kv_cache_manager, "
            "kvflow.memory.block_pool, kvflow.config, kvflow.step, kvflow.engine.wire\n"
            "from kvflow.config import EngineConfig; EngineConfig.from_kwargs(block_size=8)\n"
            "assert sys.modules['torch'] is None\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


class LongestFirst(SchedulingPolicy):
    """A policy written as a test would: longest prompt first, skip what does not fit, preempt the oldest."""
    stop_at_blocked = False

    def order_waiting(self, waiting, now):
        ordered = sorted(waiting, key=lambda r: -len(r.prompt_token_ids))
        waiting.clear()
        waiting.extend(ordered)

    def pick_victim(self, candidates):
        return candidates[0]


def test_a_policy_orders_admits_and_picks_victims():
    h = Harness(num_blocks=6, budget=64)
    h.sched.policy = LongestFirst()
    h.add("short", 3, max_tokens=12)
    h.add("long", 9, max_tokens=12)
    out, _ = h.step()
    assert [s.req_id for s in out.rows()] == ["long", "short"]
    h.run()
    assert h.sched.num_preemptions > 0 and sorted(h.finished) == ["long", "short"]


def test_scheduling_policy_is_a_config_choice():
    from kvflow.config import EngineConfig
    assert EngineConfig().scheduler.scheduling_policy == "fcfs"
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig.from_kwargs(scheduling_policy="lottery")
    assert Scheduler(KVCacheManager(4, BS), 1, 8, 64, policy="fcfs").policy.name == "fcfs"


def test_a_step_is_columns_and_its_rows_are_a_view():
    """SchedulerOutput keeps one entry per scheduled request in each column, the tokens one request after the
    other, and what few requests have by id; rows() gives back the same requests, through the wire too."""
    from kvflow.step import ScheduledRequest, SchedulerOutput
    rows = [ScheduledRequest("dec", 40, [7], [], sample=True),
            ScheduledRequest("pre", 0, list(range(1, 33)), [3, 4], sample=False),
            ScheduledRequest("cow", 16, [9], [5, 6], blocks_replaced=True, sample=True, num_draft_tokens=2),
            ScheduledRequest("ver", 20, [8, 11, 12], [7], sample=True, num_spec_tokens=2, token_bitmask=b"\x01" * 12)]
    out = SchedulerOutput.of(rows, finished_req_ids=["gone"])
    assert out.req_ids == ["dec", "pre", "cow", "ver"] and out.num_new_tokens == [1, 32, 1, 3]
    assert out.token_ids == [7, *range(1, 33), 9, 8, 11, 12] and out.num_scheduled_tokens == 37 == 1 + 32 + 1 + 3
    assert out.new_block_ids == {"pre": [3, 4], "ver": [7]} and out.block_tables == {"cow": [5, 6]}
    assert out.num_spec_tokens == {"ver": 2} and out.num_draft_tokens == {"cow": 2} and len(out) == 4
    assert out.rows() == rows and decode(encode(out)).rows() == rows
    assert decode(encode(out)).finished_req_ids == ["gone"]
    # decode rows: "dec", "cow" and "ver" (its token and 2 proposals); prompt tokens: "pre"'s 32
    assert out.shape() == (1 + 1 + 3, 32, 41 + 17 + 3 * 21, 32 * 16)
