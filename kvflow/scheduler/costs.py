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
    """step seconds ~ c0 + c1 * decode rows + c2 * prefill tokens + c3 * decode context (thousands of tokens)
    + c4 * prefill attention (millions of token pairs: a chunk of n tokens starting at position s attends
    to about n * (s + n / 2) of them), fitted by least squares over the steps seen, older steps forgotten geometrically (`forget` per step), so
    it follows the machine's load. Coefficients are kept non-negative. The model predicts a step's mean time;
    the spread of measured over predicted times is tracked too, and a budget for a target leaves room for
    it (two standard deviations), so that the target holds at the tail, not just on average."""
    MIN_STEPS = 16                 # steps seen before the model is trusted (the fixed budget applies until then)

    def __init__(self, forget: float = 0.995):
        self.forget = forget
        self.xtx = np.zeros((5, 5))
        self.xty = np.zeros(5)
        self.num_steps = 0
        self._coef: np.ndarray | None = None
        self.ratio_mean, self.ratio_var = 1.0, 0.0     # measured / predicted step time, running

    @staticmethod
    def features(decode_rows: int, prefill_tokens: int, decode_context: int, prefill_pairs: float = 0.0) -> np.ndarray:
        return np.array([1.0, decode_rows, prefill_tokens, decode_context / 1000.0, prefill_pairs / 1e6])

    def observe(self, decode_rows: int, prefill_tokens: int, decode_context: int, seconds: float,
                prefill_pairs: float = 0.0) -> None:
        x = self.features(decode_rows, prefill_tokens, decode_context, prefill_pairs)
        if self.ready:
            r = seconds / max(float(x @ self.coef), 1e-6)
            d = r - self.ratio_mean
            self.ratio_mean += 0.05 * d
            self.ratio_var = 0.95 * (self.ratio_var + 0.05 * d * d)
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

    def predict(self, decode_rows: int, prefill_tokens: int, decode_context: int, prefill_start: int = 0) -> float:
        pairs = prefill_tokens * (prefill_start + prefill_tokens / 2)
        return float(self.features(decode_rows, prefill_tokens, decode_context, pairs) @ self.coef)

    def prefill_budget(self, decode_rows: int, decode_context: int, target_s: float, max_tokens: int,
                       min_tokens: int, prefill_start: int = 0) -> int:
        """The most prefill tokens a step with these decodes can take and still finish within `target_s`, the
        chunk starting at position `prefill_start` (at least `min_tokens`, so that prompts always progress;
        `max_tokens` until the model is trusted). The time is quadratic in the chunk: solved exactly."""
        if not self.ready:
            return max_tokens
        c = self.coef
        target_s /= self.ratio_mean + 2 * self.ratio_var ** 0.5     # room for the spread of step times
        left = target_s - self.predict(decode_rows, 0, decode_context)
        a, b = c[4] / 2e6, c[2] + c[4] * prefill_start / 1e6      # a n^2 + b n <= left
        if left <= 0:
            return min_tokens
        if a > 0:
            n = (-b + (b * b + 4 * a * left) ** 0.5) / (2 * a)
        elif b > 0:
            n = left / b
        else:
            return max_tokens
        return int(min(max(n, min_tokens), max_tokens))
