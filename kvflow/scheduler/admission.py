"""How a waiting request gets its KV blocks when the scheduler admits it: swapped back in (beside the last step,
or now), forked from its source (the samples 1..n-1 of an n > 1 request, copy-on-write), or from the prefix
cache and the disk tier plus new blocks; and until then, whether it must wait (its disk-tier blocks are being
read, or its fork source has not computed the prompt).

`Admission` holds the Scheduler's admission steps (kvflow/scheduler/scheduler.py: `Scheduler(Admission)`); it
has no state of its own and reads the scheduler's: kv, requests, max_num_batched_tokens, max_model_len,
enable_chunked_prefill, static_reservation, async_recovery, _recovering and _now. No torch here.
"""
from __future__ import annotations

from kvflow.memory.block_pool import Block
from kvflow.request import Request, RequestStatus


class Admission:
    def _prefix(self, req: Request) -> tuple[list[Block], list[int]] | None:
        """What a waiting request starts from: (cached blocks, disk-tier keys ready to load); None while it
        must wait (its disk-tier blocks are being read, or its fork source has not computed the prompt)."""
        if req.request_id in self._recovering:
            return [], []
        if self.kv.is_swapped(req.request_id):
            if self.async_recovery and self.kv.swap_in(
                    req, min(req.num_tokens_with_spec - req.num_computed_tokens, self.max_num_batched_tokens), True):
                self._recovering.add(req.request_id)
                req.status = RequestStatus.WAITING_FOR_KV
                return None
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
        if req.request_id in self._recovering:       # its blocks came back beside the last step
            if not self.kv.allocate_slots(req, min(req.num_tokens_with_spec - req.num_computed_tokens, budget)):
                return False
            self._recovering.discard(req.request_id)
            return True
        if self.kv.is_swapped(req.request_id):
            return self.kv.swap_in(req, min(req.num_tokens_with_spec - req.num_computed_tokens, budget))
        if req.fork_from is not None:
            if self.kv.pool.num_free < 1:      # room for the copy of the shared tail block
                return False
            self.kv.fork(req.fork_from, req, len(req.prompt_token_ids) - 1)
            room = self._full_length(req) - req.num_computed_tokens if self.static_reservation else 1
            if not self.kv.allocate_slots(req, room):
                self.kv.free(req)
                req.num_computed_tokens = 0
                return False
            req.fork_from = None
            self._first_schedule(req, req.num_computed_tokens)
            return True
        num_cached = (len(computed) + len(keys)) * self.kv.block_size
        num_loaded = len(keys) * self.kv.block_size
        if not self.enable_chunked_prefill and req.num_tokens - num_cached > budget:
            return False
        num_new = min(req.num_tokens - num_cached, budget)
        if self.static_reservation:    # room for its whole possible length, now
            num_new = self._full_length(req) - num_cached
        if not self.kv.allocate_slots(req, num_loaded + num_new, computed):
            return False
        self.kv.load_blocks(req, len(computed), keys)
        self.kv.record_lookup(req.num_tokens, num_cached)
        req.num_computed_tokens = num_cached
        self._first_schedule(req, num_cached)
        return True

    def _full_length(self, req: Request) -> int:
        return min(len(req.prompt_token_ids) + req.max_tokens, self.max_model_len)

    def _first_schedule(self, req: Request, num_cached: int) -> None:
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            req.first_scheduled_time = self._now
