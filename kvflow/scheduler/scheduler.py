"""Continuous batching with chunked prefill under a token budget, and preemption by recompute or swap.

`schedule()` returns a plain-data `SchedulerOutput` (kvflow/step.py); `update_from_output()` applies the
runner's `RunnerOutput` and returns the engine core's outputs. One rule decides how many tokens a request
computes in a step: the tokens it knows (proposed ones included) minus the tokens it has computed, within
the step's budget. So prefill chunks, decodes and verification of proposed tokens mix freely in one step.
Running requests are served first, oldest first; waiting ones are admitted while the budget,
`max_num_seqs` and the KV blocks allow.

When a running request cannot get a block, the newest running request is preempted and goes back to the
front of the queue. Either its blocks are freed and it is recomputed later (its prompt and the tokens it
already generated), or they are swapped out to the swap tier and swapped back in when it resumes;
`PreemptionCost` picks the cheaper per request. No request is lost and its output does not change.

A waiting request whose prefix continues in the disk tier waits in the loading-KV state while the tier
reads it, and other work steps on. A request with `fork_from` (the samples 1..n-1 of an n > 1 request)
waits until its source has computed the prompt, then forks its blocks (copy-on-write).

No torch here, and time comes from the injected clock: the simulator runs this scheduler unchanged.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvflow.config import PREEMPTION_MODES
from kvflow.engine.wire import EngineCoreOutput
from kvflow.memory.block_pool import Block
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.request import Request, RequestStatus
from kvflow.scheduler.policy import SchedulingPolicy, make_policy
from kvflow.step import NewRequestData, RunnerOutput, ScheduledRequest, SchedulerOutput



@dataclass
class PreemptionCost:
    """Estimated seconds to bring a preempted request back: recompute its tokens, or move its blocks out
    to the swap tier and back. The engine core refines the rates from what it measures."""
    block_bytes: int                        # KV bytes of one block, all layers
    prefill_tokens_per_s: float = 2000.0    # measured on steps that are mostly prefill
    swap_bytes_per_s: float = 4e9           # measured by the model runner at start
    swap_overhead_s: float = 2e-4           # per direction: one copy call per KV tensor

    def recompute_s(self, num_computed_tokens: int) -> float:
        return num_computed_tokens / self.prefill_tokens_per_s

    def swap_s(self, num_blocks: int) -> float:
        return 2 * (num_blocks * self.block_bytes / self.swap_bytes_per_s + self.swap_overhead_s)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 preemption_mode: str = "auto", cost: PreemptionCost | None = None,
                 clock: Callable[[], float] = time.monotonic, policy: SchedulingPolicy | str = "fcfs"):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {preemption_mode!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.preemption_mode = preemption_mode
        self.cost = cost or PreemptionCost(block_bytes=1)
        self.clock = clock
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.requests: dict[str, Request] = {}     # every live request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._unsent: set[str] = set()             # the runner has not been told about these yet
        self._finished: list[str] = []             # ended since the last step: the runner drops them
        self._now = 0.0                            # the clock at the start of the step being scheduled
        self.num_preemptions = 0
        self.num_swapped_out = 0                   # preemptions that went to the swap tier (the rest: recompute)
        self.num_scheduled_tokens = 0              # tokens computed, all steps

    # ---- requests in and out ---------------------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self._unsent.add(req.request_id)
        self.waiting.append(req)

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """End requests (stopped by the frontend, or aborted) wherever they are; unknown ids are ignored."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, status)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_loading(self) -> int:
        return sum(1 for r in self.waiting if r.status == RequestStatus.WAITING_FOR_KV)

    # ---- one step ---------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished)
        self._finished = []
        self._now = self.clock()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens_with_spec - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.policy.pick_victim(self.running[i:])     # not one already in this step
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                self._add_to_step(out, req, num_new)
                budget -= num_new
                i += 1
        # admit waiting requests (not in a step that had to preempt: memory is short)
        self.policy.order_waiting(self.waiting, self._now)
        j = 0
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[j]
            prefix = self._prefix(req)
            if prefix is None:             # still loading its KV, or its fork source is computing the prompt
                j += 1
                continue
            if not self._admit(req, budget, *prefix):
                if self.policy.stop_at_blocked:
                    break
                j += 1
                continue
            del self.waiting[j]
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_new = min(req.num_tokens_with_spec - req.num_computed_tokens, budget)
            self._add_to_step(out, req, num_new)
            budget -= num_new
        out.block_ops = self.kv.take_ops()
        self.num_scheduled_tokens += out.num_scheduled_tokens
        return out

    def _add_to_step(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        rid, start = req.request_id, req.num_computed_tokens
        end = start + num_new
        if req.spec_token_ids and end > req.num_tokens:
            tokens = (req.all_token_ids + req.spec_token_ids)[start:end]
        else:
            tokens = req.all_token_ids[start:end]
        if rid in self._unsent:
            self._unsent.discard(rid)
            out.new_requests.append(NewRequestData(rid, req.prompt_token_ids, req.params, sorted(req.stop_ids)))
        block_ids, replaced = self.kv.block_update(rid)
        sample = end == req.num_tokens_with_spec
        out.scheduled.append(ScheduledRequest(rid, start, tokens, block_ids, replaced, sample,
                                              len(req.spec_token_ids) if sample else 0))

    def _prefix(self, req: Request) -> tuple[list[Block], list[int]] | None:
        """What a waiting request starts from: (cached blocks, disk-tier keys ready to load); None while it
        must wait (its disk-tier blocks are being read, or its fork source has not computed the prompt)."""
        if self.kv.is_swapped(req.request_id):
            return [], []
        if req.fork_from is not None:
            src = self.requests.get(req.fork_from)
            if src is None or src.status == RequestStatus.PREEMPTED:
                req.fork_from = None           # nothing to share any more: compute it the usual way
            elif src.num_computed_tokens < len(req.prompt_token_ids) - 1 or not self.kv.table(src.request_id):
                return None
            else:
                return [], []
        computed = self.kv.get_computed_blocks(req)
        keys = self.kv.tier_hits(req, len(computed))
        if keys:
            num_ready = self.kv.fetch(req, keys)
            if num_ready is None:
                req.status = RequestStatus.WAITING_FOR_KV
                return None
            keys = keys[:num_ready]
        return computed, keys

    def _admit(self, req: Request, budget: int, computed: list[Block], keys: list[int]) -> bool:
        """Give a waiting request its blocks: swapped back in, forked from its source, or from the prefix
        cache and the disk tier plus new ones. False when the blocks are short."""
        if self.kv.is_swapped(req.request_id):
            return self.kv.swap_in(req, min(req.num_tokens_with_spec - req.num_computed_tokens, budget))
        if req.fork_from is not None:
            if self.kv.pool.num_free < 1:      # room for the copy of the shared tail block
                return False
            self.kv.fork(req.fork_from, req, len(req.prompt_token_ids) - 1)
            if not self.kv.allocate_slots(req, 1):
                self.kv.free(req)
                req.num_computed_tokens = 0
                return False
            req.fork_from = None
            self._first_schedule(req, req.num_computed_tokens)
            return True
        num_cached = (len(computed) + len(keys)) * self.kv.block_size
        num_loaded = len(keys) * self.kv.block_size
        if not self.kv.allocate_slots(req, num_loaded + min(req.num_tokens - num_cached, budget), computed):
            return False
        self.kv.load_blocks(req, len(computed), keys)
        self.kv.record_lookup(req.num_tokens, num_cached)
        req.num_computed_tokens = num_cached
        self._first_schedule(req, num_cached)
        return True

    def _first_schedule(self, req: Request, num_cached: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            req.first_scheduled_time = self._now

    def _preempt(self, req: Request) -> None:
        req.spec_token_ids = []
        swap = self.preemption_mode == "swap" or (
            self.preemption_mode == "auto"
            and self.cost.swap_s(len(self.kv.table(req.request_id))) < self.cost.recompute_s(req.num_computed_tokens))
        if swap and self.kv.swap_out(req):
            self.num_swapped_out += 1
        else:
            self.kv.free(req)
            req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance the scheduled requests by what the step computed: roll back rejected proposals, append
        the sampled tokens, apply the token-level stop rules, free what finished. Returns the outputs."""
        outputs = []
        for s, sampled, logprobs in zip(sched.scheduled, result.sampled_token_ids,
                                        result.logprobs or [None] * len(sched.scheduled)):
            req = self.requests.get(s.req_id)
            if req is None:                    # ended while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            if s.num_spec_tokens:              # proposals after the first rejected one are not computed
                req.num_computed_tokens -= s.num_spec_tokens - max(len(sampled) - 1, 0)
                req.spec_token_ids = []
                self.kv.trim(req)
            prompt_logprobs = result.prompt_logprobs.get(s.req_id)
            if prompt_logprobs:
                req.num_prompt_logprobs += len(prompt_logprobs)
            new_tokens, status = [], None
            for token in sampled:
                req.append_token(token)
                new_tokens.append(token)
                status = self._check_stop(req, token)
                if status is not None:
                    break
            self.kv.cache_full_blocks(req)
            if not new_tokens and not prompt_logprobs:
                continue
            if status is not None:
                self._finish(req, status)
            outputs.append(EngineCoreOutput(
                request_id=req.request_id, new_token_ids=new_tokens,
                new_logprobs=logprobs[:len(new_tokens)] if logprobs is not None and new_tokens else None,
                finish_reason=status.value if status is not None else None, stop_reason=req.stop_reason,
                num_cached_tokens=req.num_cached_tokens, first_scheduled_time=req.first_scheduled_time,
                num_preemptions=req.num_preemptions, prompt_logprobs=prompt_logprobs or None))
        return outputs

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        n = len(req.output_token_ids)
        if token in req.stop_ids and n >= req.params.min_tokens:
            if token in (req.params.stop_token_ids or ()):
                req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if n >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, or aborted) wherever it is, and give back its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.forget(req)
        req.status = status
        req.finished_time = self.clock()
        del self.requests[req.request_id]
        self._unsent.discard(req.request_id)
        self._finished.append(req.request_id)

    def check(self) -> None:
        """Assert that every block is free, cached, or held by a live request, exactly as often as held."""
        live = [r.request_id for r in self.running] + [r.request_id for r in self.waiting]
        assert sorted(live) == sorted(self.requests), "a request is lost or listed twice"
        self.kv.check(live)
