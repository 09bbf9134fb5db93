"""`priority`: vLLM's priority scheduling. A lower `priority` value runs first, ties by arrival. A waiting
request takes the batch seat of a running one of strictly lower priority (a higher value), which is
preempted and resumes later; when memory runs out, the lowest-priority, latest request is the victim."""
from __future__ import annotations

from kvflow.request import Request
from kvflow.scheduler.policy import RankedPolicy, register_policy


@register_policy("priority")
class Priority(RankedPolicy):
    def rank(self, req: Request, now: float) -> tuple:
        return req.priority, req.arrival_time

    def outranks(self, waiting: Request, running: Request, now: float) -> bool:
        return waiting.priority < running.priority
