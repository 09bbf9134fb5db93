"""`cache-aware`: SGLang's longest-prefix-match order. Among the first WINDOW waiting requests, those whose
prompt has the longest prefix in the prefix cache go first (their prefill is cheapest, and serving them
while their prefix is cached avoids thrashing it out and computing it again). A request that has waited
MAX_WAIT_S seconds goes ahead of the sorted ones, in arrival order, so nothing starves; past the window the
queue keeps arrival order (SGLang likewise falls back to FCFS on a long queue)."""
from __future__ import annotations

from collections import deque

from kvflow.request import Request
from kvflow.scheduler.policy import SchedulingPolicy, register_policy

WINDOW = 128
MAX_WAIT_S = 5.0


@register_policy("cache-aware")
class CacheAware(SchedulingPolicy):
    stop_at_blocked = False

    def __init__(self, window: int = WINDOW, max_wait_s: float = MAX_WAIT_S):
        self.window, self.max_wait_s = window, max_wait_s

    def cached_tokens(self, req: Request) -> int:
        kv = self.scheduler.kv
        if kv.is_swapped(req.request_id) or req.fork_from is not None:
            return 0
        return len(kv.get_computed_blocks(req)) * kv.block_size

    def order_waiting(self, waiting: deque[Request], now: float) -> None:
        head = list(waiting)[:self.window]
        if len(head) < 2:
            return
        old = sorted((r for r in head if now - r.arrival_time >= self.max_wait_s), key=lambda r: r.arrival_time)
        rest = [r for r in head if now - r.arrival_time < self.max_wait_s]
        rest.sort(key=lambda r: (-self.cached_tokens(r), r.arrival_time))
        for _ in head:
            waiting.popleft()
        waiting.extendleft(reversed(old + rest))
