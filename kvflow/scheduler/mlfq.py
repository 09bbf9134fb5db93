"""`mlfq`: FastServe's skip-join multi-level feedback queue (survey section 3.3).

Levels 0..LEVELS-1; level i gives a request a quantum of QUANTUM * 2**i generated tokens before it is
demoted to level i+1 (the last level keeps it: the cap on demotions). A request does not start at level 0:
it skip-joins the first level whose quantum covers its predicted cost, its prompt counted in decode-token
equivalents (PREFILL_PER_TOKEN) plus its predicted output length (kvflow/predict), so a long job does not
first push every short one aside. Within a level, requests are served in the order they entered it. A
request that has waited (not run) STARVATION_S seconds at its level is promoted to level 0.

Lower levels run first; a waiting request takes the seat of a running one at a higher level (FastServe's
preemption at iteration granularity). The queue length per level is reported on /metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvflow.request import Request, RequestStatus
from kvflow.scheduler.policy import RankedPolicy, register_policy

LEVELS = 6
QUANTUM = 16                  # generated tokens at level 0; doubles per level
PREFILL_PER_TOKEN = 1 / 32    # a prompt token costs about this many decode tokens
STARVATION_S = 10.0


@dataclass
class _State:
    level: int
    entered: float             # when it entered its level (or last ran there)
    tokens: int = 0            # generated at this level


@register_policy("mlfq")
class MLFQ(RankedPolicy):
    needs_prediction = True

    def __init__(self, levels: int = LEVELS, quantum: int = QUANTUM, starvation_s: float = STARVATION_S):
        self.levels, self.quantum, self.starvation_s = levels, quantum, starvation_s
        self.state: dict[str, _State] = {}

    def quantum_of(self, level: int) -> int:
        return self.quantum << level

    def join_level(self, req: Request) -> int:
        cost = len(req.prompt_token_ids) * PREFILL_PER_TOKEN + req.predicted_remaining()
        for level in range(self.levels):
            if cost <= self.quantum_of(level):
                return level
        return self.levels - 1

    def on_add(self, req: Request, now: float) -> None:
        self.state[req.request_id] = _State(self.join_level(req), now)

    def on_computed(self, req: Request, num_prompt_tokens: int, num_output_tokens: int, now: float) -> None:
        st = self.state.get(req.request_id)
        if st is None:
            return
        st.tokens += num_output_tokens
        st.entered = now                   # waiting time at a level counts from when it last ran
        if st.tokens >= self.quantum_of(st.level) and st.level < self.levels - 1:
            self.state[req.request_id] = _State(st.level + 1, now)

    def on_finish(self, req: Request) -> None:
        self.state.pop(req.request_id, None)

    def order_waiting(self, waiting, now: float) -> None:
        for req in waiting:                # promotion of the starving
            st = self.state.get(req.request_id)
            if st is not None and st.level > 0 and now - st.entered > self.starvation_s:
                self.state[req.request_id] = _State(0, now)
        super().order_waiting(waiting, now)

    def level(self, req: Request) -> int:
        st = self.state.get(req.request_id)
        return st.level if st is not None else 0

    def rank(self, req: Request, now: float) -> tuple:
        st = self.state.get(req.request_id)
        return (st.level, st.entered if req.status != RequestStatus.RUNNING else 0.0) if st else (0, 0.0)

    def outranks(self, waiting: Request, running: Request, now: float) -> bool:
        return self.level(waiting) < self.level(running)

    def queue_lengths(self) -> dict[str, int]:
        counts = {str(i): 0 for i in range(self.levels)}
        for st in self.state.values():
            counts[str(st.level)] += 1
        return counts
