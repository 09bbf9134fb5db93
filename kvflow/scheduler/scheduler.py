"""Continuous batching with chunked prefill under a token budget, and preemption by recompute or swap.

Every request carries `num_computed_tokens`; a step gives each scheduled request some new tokens
to compute (1 for a decode, up to the remaining budget for a prompt chunk), so prefill chunks and
decodes mix freely in one step. Running requests are served first, oldest first; waiting ones are
admitted while the budget, `max_num_seqs` and the KV blocks allow.

When a running request cannot get a block, the newest running request is preempted and goes back to
the front of the queue. Either its blocks are freed and it is recomputed later (its prompt and the
tokens it already generated), or they are swapped out to the second tier and swapped back in when it
resumes; `PreemptionCost` picks the cheaper per request. No request is lost and its output does not
change either way.

The samples 1..n-1 of an n > 1 request wait until sample 0 has computed the prompt, then fork from it:
they share its blocks (copy-on-write) instead of computing the prompt again.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.request import Request, RequestStatus

PREEMPTION_MODES = ("auto", "recompute", "swap")


@dataclass
class PreemptionCost:
    """Estimated seconds to bring a preempted request back: recompute its tokens, or move its blocks out
    to the swap tier and back. The engine core refines the rates from what it measures."""
    block_bytes: int                        # KV bytes of one block, all layers
    prefill_tokens_per_s: float = 2000.0    # measured on steps that are mostly prefill
    swap_bytes_per_s: float = 4e9           # measured by the model runner at start
    swap_overhead_s: float = 2e-4           # per direction: one copy call per KV tensor

    def recompute_s(self, req: Request) -> float:
        return req.num_computed_tokens / self.prefill_tokens_per_s

    def swap_s(self, req: Request) -> float:
        return 2 * (len(req.block_table) * self.block_bytes / self.swap_bytes_per_s + self.swap_overhead_s)


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # per request, this step
    block_ops: list = field(default_factory=list)   # KV block moves to apply before the forward (in order)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 preemption_mode: str = "auto", cost: PreemptionCost | None = None):
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {preemption_mode!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.preemption_mode = preemption_mode
        self.cost = cost or PreemptionCost(block_bytes=1)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_swapped_out = 0                # preemptions that went to the swap tier (the rest: recompute)
        self.num_scheduled_tokens = 0           # tokens computed, all steps

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
        # admit waiting requests (not in a step that had to preempt: memory is short)
        j = 0
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[j]
            admitted = self._admit(req, budget)
            if admitted is None:           # a forked sample whose source is still computing the prompt
                j += 1
                continue
            if not admitted:
                break
            del self.waiting[j]
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(min(req.num_tokens - req.num_computed_tokens, budget))
            budget -= batch.num_new_tokens[-1]
        batch.block_ops = self.kv.take_ops()
        self.num_scheduled_tokens += sum(batch.num_new_tokens)
        return batch

    def _admit(self, req: Request, budget: int) -> bool | None:
        """Give a waiting request its blocks: swapped back in, forked from its source sample, or from the
        prefix cache plus new ones. None: not yet (its source is computing the prompt)."""
        if req.swapped_table:
            return self.kv.swap_in(req, min(req.num_tokens - req.num_computed_tokens, budget))
        src = req.fork_source
        if src is not None:
            if src.status.finished or src.status == RequestStatus.PREEMPTED:
                req.fork_source = None     # nothing to share any more: compute it the usual way
            elif src.num_computed_tokens < len(req.prompt_token_ids) - 1 or not src.block_table:
                return None
            else:
                if self.kv.pool.num_free < 1:   # room for the copy of the shared tail block
                    return False
                self.kv.fork(req, src)
                if not self.kv.allocate_slots(req, 1):
                    self.kv.free(req)
                    req.num_computed_tokens = 0
                    return False
                req.fork_source = None
                self._first_schedule(req, req.num_computed_tokens)
                return True
        computed = self.kv.get_computed_blocks(req)
        from_disk = self.kv.disk_hits(req, len(computed))     # the prefix continues in the disk tier
        num_cached = (len(computed) + len(from_disk)) * self.kv.block_size
        num_loaded = len(from_disk) * self.kv.block_size
        if not self.kv.allocate_slots(req, num_loaded + min(req.num_tokens - num_cached, budget), computed):
            return False
        self.kv.load_blocks(req, len(computed), from_disk)
        self.kv.record_lookup(req.num_tokens, num_cached)
        req.num_computed_tokens = num_cached
        self._first_schedule(req, num_cached)
        return True

    @staticmethod
    def _first_schedule(req: Request, num_cached: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            req.first_scheduled_time = time.monotonic()

    def _preempt(self, req: Request) -> None:
        swap = self.preemption_mode == "swap" or (
            self.preemption_mode == "auto" and self.cost.swap_s(req) < self.cost.recompute_s(req))
        if swap and self.kv.swap_out(req):
            self.num_swapped_out += 1
        else:
            self.kv.free(req)
            req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Request]:
        """Advance the scheduled requests by what the step computed; append sampled tokens and apply
        the token-level stop rules. Returns the requests that finished in this step (already freed)."""
        finished = []
        for req, num_new, token in zip(batch.requests, batch.num_new_tokens, sampled):
            req.num_computed_tokens += num_new
            self.kv.cache_full_blocks(req)
            if token is None:          # a prompt chunk that does not reach the end of the known tokens
                continue
            req.append_token(token)
            status = self._check_stop(req, token)
            if status is not None:
                self.finish(req, status)
                finished.append(req)
        return finished

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        n = len(req.output_token_ids)
        if token in req.stop_ids and n >= req.params.min_tokens:
            if token in (req.params.stop_token_ids or ()):
                req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if n >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, or aborted) wherever it is, and give back its blocks."""
        if req.status.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = status
        req.finished_time = time.monotonic()

    def check(self) -> None:
        """Assert that every block is free, cached, or held by a live request, exactly as often as held."""
        self.kv.check(self.running + list(self.waiting))
