"""Scheduling policies: the seam through which the scheduler asks what order to serve requests in.

A policy decides three things (survey section 3.3):
  - the order of the waiting queue, before each step's admissions (`order_waiting`);
  - whether admission stops at the first waiting request that does not fit, or skips it and tries
    the next ones (`stop_at_blocked`);
  - which running request is preempted when memory runs out (`pick_victim`).
The scheduler keeps the mechanics (budget, blocks, preemption by swap or recompute). A new policy is a
new file with a `@register_policy("name")` class, plus its module in POLICY_MODULES (so that the
config can offer it without importing it). No torch.
"""
from __future__ import annotations

import importlib
from collections import deque

from kvflow.request import Request

# policy name -> the module that registers it
POLICY_MODULES: dict[str, str] = {"fcfs": "kvflow.scheduler.policy"}
_POLICIES: dict[str, type[SchedulingPolicy]] = {}


def register_policy(name: str):
    def wrap(cls):
        cls.name = name
        _POLICIES[name] = cls
        return cls
    return wrap


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICY_MODULES:
        raise ValueError(f"scheduling_policy must be one of {', '.join(POLICY_MODULES)}, got {name!r}")
    importlib.import_module(POLICY_MODULES[name])
    return _POLICIES[name]()


class SchedulingPolicy:
    name = ""
    stop_at_blocked = True        # head-of-line: a request that does not fit stops admission this step

    def order_waiting(self, waiting: deque[Request], now: float) -> None:
        """Reorder the waiting queue in place (preempted requests were put back at its front)."""

    def pick_victim(self, candidates: list[Request]) -> Request:
        """The request to preempt among the running ones not yet scheduled this step (in running order,
        oldest first)."""
        return candidates[-1]


@register_policy("fcfs")
class FCFS(SchedulingPolicy):
    """First come, first served: arrival order, head-of-line admission, the newest request preempted."""
