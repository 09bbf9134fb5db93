"""What a step and a preemption cost, as the scheduler estimates them (no torch; numpy only).

`PreemptionCost` chooses between recompute and swap for a preempted request. `StepTimeModel` learns, online,
how long a step takes as a function of its shape (decode rows, prefill tokens, the decodes' context), so that
with a TPOT target (`--tpot-slo-ms`) the scheduler sizes each step's prefill chunk to keep the decodes on
time (survey section 3.2: an SLO-aware token budget; Sarathi-Serve fixes the budget offline instead, which
`kvflow tune` does).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


class StepTimeModel:
    """step seconds ~ c0 + c1 * decode rows + c2 * prefill tokens + c3 * decode context (thousands of tokens),
    fitted by least squares over the steps seen, older steps forgotten geometrically (`forget` per step), so
    it follows the machine's load. Coefficients are kept non-negative."""
    MIN_STEPS = 16                 # steps seen before the model is trusted (the fixed budget applies until then)

    def __init__(self, forget: float = 0.995):
        self.forget = forget
        self.xtx = np.zeros((4, 4))
        self.xty = np.zeros(4)
        self.num_steps = 0
        self._coef: np.ndarray | None = None

    @staticmethod
    def features(decode_rows: int, prefill_tokens: int, decode_context: int) -> np.ndarray:
        return np.array([1.0, decode_rows, prefill_tokens, decode_context / 1000.0])

    def observe(self, decode_rows: int, prefill_tokens: int, decode_context: int, seconds: float) -> None:
        x = self.features(decode_rows, prefill_tokens, decode_context)
        self.xtx = self.forget * self.xtx + np.outer(x, x)
        self.xty = self.forget * self.xty + x * seconds
        self.num_steps += 1
        self._coef = None

    @property
    def coef(self) -> np.ndarray:
        if self._coef is None:
            ridge = np.diag(1e-6 * np.diag(self.xtx) + 1e-12)      # per feature: scales differ a lot
            c = np.linalg.solve(self.xtx + ridge, self.xty)
            self._coef = np.maximum(c, 0.0)
        return self._coef

    @property
    def ready(self) -> bool:
        return self.num_steps >= self.MIN_STEPS

    def predict(self, decode_rows: int, prefill_tokens: int, decode_context: int) -> float:
        return float(self.features(decode_rows, prefill_tokens, decode_context) @ self.coef)

    def prefill_budget(self, decode_rows: int, decode_context: int, target_s: float, max_tokens: int,
                       min_tokens: int) -> int:
        """The most prefill tokens a step with these decodes can take and still finish within `target_s`
        (at least `min_tokens`, so that prompts always progress; `max_tokens` until the model is trusted)."""
        if not self.ready:
            return max_tokens
        c = self.coef
        left = target_s - self.predict(decode_rows, 0, decode_context)
        if c[2] <= 0:
            return max_tokens
        return int(min(max(left / c[2], min_tokens), max_tokens))
