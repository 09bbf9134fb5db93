"""Scheduling policies: the seam through which the scheduler asks what order to serve requests in.

A policy decides (survey section 3.3):
  - the order of the waiting queue before each step's admissions, and of the running requests (which get
    the step's token budget first): `order_waiting`, `order_running`;
  - whether admission stops at the first waiting request that does not fit, or tries the next ones
    (`stop_at_blocked`);
  - whether a waiting request may take the batch seat of a running one that ranks after it (`preemptive`:
    the running one is preempted, by swap or recompute, and waits again);
  - which running request is preempted when memory runs out (`pick_victim`).
It hears of arrivals, computed tokens and endings (`on_add`, `on_computed`, `on_finish`) to keep its own
accounts (MLFQ levels, fair-share counters). The scheduler keeps the mechanics (budget, blocks,
preemption). A new policy is a new file with a `@register_policy("name")` class, plus its module in
POLICY_MODULES (so that the config can offer it without importing it). No torch.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from kvflow.registry import Registry
from kvflow.request import Request

if TYPE_CHECKING:
    from kvflow.scheduler.scheduler import Scheduler

# policy name -> the module that registers it
POLICIES = Registry("scheduling_policy", {
    "fcfs": "kvflow.scheduler.policy",
    "priority": "kvflow.scheduler.priority",
    "sjf": "kvflow.scheduler.sjf",
    "mlfq": "kvflow.scheduler.mlfq",
    "cache-aware": "kvflow.scheduler.cache_aware",
    "fair": "kvflow.scheduler.fair",
})
POLICY_MODULES = POLICIES.modules
register_policy = POLICIES.register


def make_policy(name: str, **options) -> SchedulingPolicy:
    """The policy `name`, built with the options it takes (others are ignored: e.g. `client_weights` is
    the fair policy's)."""
    cls = POLICIES.get(name)
    return cls(**{k: v for k, v in options.items() if k in cls.OPTIONS})


class SchedulingPolicy:
    name = ""
    OPTIONS: tuple[str, ...] = ()  # the keyword options its constructor takes
    stop_at_blocked = True         # head-of-line: a request that does not fit stops admission this step
    preemptive = False             # a waiting request may take the seat of a running one ranked after it
    needs_prediction = False       # it reads Request.length_estimate (the scheduler then runs a predictor)

    def bind(self, scheduler: Scheduler) -> None:
        """Called once by the scheduler that uses it (cache-aware reads its KV manager)."""
        self.scheduler = scheduler

    def order_waiting(self, waiting: deque[Request], now: float) -> None:
        """Reorder the waiting queue in place (preempted requests were put back at its front)."""

    def order_running(self, running: list[Request], now: float) -> None:
        """Reorder the running requests in place: the first ones get the step's token budget first."""

    def outranks(self, waiting: Request, running: Request, now: float) -> bool:
        """Whether `waiting` should take the seat of `running` (asked only when `preemptive`)."""
        return False

    def pick_victim(self, candidates: list[Request]) -> Request:
        """The request to preempt among the running ones not yet scheduled this step (in running order)."""
        return candidates[-1]

    def on_add(self, req: Request, now: float) -> None:
        """A request arrived."""

    def on_computed(self, req: Request, num_prompt_tokens: int, num_output_tokens: int, now: float) -> None:
        """A step computed this many prompt tokens of `req` and gave it this many new output tokens."""

    def on_finish(self, req: Request) -> None:
        """A request ended (any reason): forget what is kept about it."""

    def queue_lengths(self) -> dict[str, int]:
        """The policy's own queues, for /metrics (MLFQ: requests per level)."""
        return {}


class RankedPolicy(SchedulingPolicy):
    """A policy defined by a rank (lower is served first): waiting and running requests are kept sorted by
    it, and a waiting request takes the seat of a running one whose rank is worse by more than `margin`
    (a policy whose rank is a tuple overrides `outranks`)."""
    preemptive = True
    stop_at_blocked = False
    margin = 0.0                   # hysteresis, so that two requests of nearly equal rank do not swap seats

    def rank(self, req: Request, now: float) -> float | tuple:
        raise NotImplementedError

    def order_waiting(self, waiting: deque[Request], now: float) -> None:
        ordered = sorted(waiting, key=lambda r: self.rank(r, now))
        waiting.clear()
        waiting.extend(ordered)

    def order_running(self, running: list[Request], now: float) -> None:
        running.sort(key=lambda r: self.rank(r, now))

    def outranks(self, waiting: Request, running: Request, now: float) -> bool:
        return self.rank(waiting, now) < self.rank(running, now) - self.margin

    def pick_victim(self, candidates: list[Request]) -> Request:
        now = self.scheduler._now
        return max(candidates, key=lambda r: self.rank(r, now))


@register_policy("fcfs")
class FCFS(SchedulingPolicy):
    """First come, first served: arrival order, head-of-line admission, the newest request preempted."""
