"""Continuous batching with chunked prefill under a token budget, and preemption by recompute.

Every request carries `num_computed_tokens`; a step gives each scheduled request some new tokens
to compute (1 for a decode, up to the remaining budget for a prompt chunk), so prefill chunks and
decodes mix freely in one step. Running requests are served first, oldest first; waiting ones are
admitted while the budget, `max_num_seqs` and the KV blocks allow. When a running request cannot
get a block, the newest running request is preempted: its blocks are freed and it goes back to
the front of the queue to be recomputed (its prompt and the tokens it already generated), so no
request is ever lost and its output does not change.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # per request, this step

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            computed = self.kv.get_computed_blocks(req)
            num_cached = len(computed) * self.kv.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, num_new, computed):
                break
            self.waiting.popleft()
            self.kv.record_lookup(req.num_tokens, num_cached)
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _preempt(self, req: Request) -> None:
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
