"""`sjf`: shortest predicted remaining output first, preemptive (shortest remaining processing time), with
aging so that nothing starves.

A request's rank is its predicted remaining output tokens (kvflow/predict: re-estimated as it generates,
conditioned on the length reached) minus AGING tokens for every second since it arrived. A long request
therefore outranks any newly arrived one after at most (its predicted length / AGING) seconds: that is its
starvation bound. A waiting request takes the seat of a running one only if it ranks better by more than
`margin` tokens, so two requests of nearly equal rank do not trade seats back and forth.
"""
from __future__ import annotations

from kvflow.request import Request
from kvflow.scheduler.policy import RankedPolicy, register_policy

AGING = 8.0            # predicted tokens forgiven per second of age


@register_policy("sjf")
class SJF(RankedPolicy):
    needs_prediction = True
    margin = 32.0

    def __init__(self, aging: float = AGING):
        self.aging = aging

    def rank(self, req: Request, now: float) -> float:
        return req.predicted_remaining() - self.aging * (now - req.arrival_time)
