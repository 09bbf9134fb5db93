"""Per-request sampling parameters, with vLLM's field names and defaults.

`SamplingParams` is validated (and lightly normalised) in `__post_init__`; every
error is a ValueError whose message starts with the offending field's name.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from kvflow.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20       # largest top-N a request may ask for
GREEDY_EPS = 1e-5       # temperatures below this are treated as greedy (argmax)
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1   # every int crosses to the engine core as a msgpack int64


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16         # None = up to the context limit
    min_tokens: int = 0
    logprobs: int | None = None         # top-N; 0 = only the sampled token's logprob
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None   # token id -> bias in [-100, 100] added to its logit
    prompt_logprobs: int | None = None  # top-N per prompt token (plus the prompt token itself); None = off
    structured_outputs: StructuredOutputsParams | None = None   # constrain the output (kvflow/structured)

    def __post_init__(self) -> None:
        self.n = self._int("n", self.n, lo=1)
        self.presence_penalty = self._real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = self._real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = self._real("repetition_penalty", self.repetition_penalty, 0.0, None,
                                             lo_open=True)
        self.temperature = self._real("temperature", self.temperature, 0.0, None,
                                      hint="temperature must be non-negative")
        self.top_p = self._real("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        self.top_k = self._int("top_k", self.top_k, lo=0,
                               hint="top_k must be -1, 0 (off) or a positive int below 2**63")
        self.min_p = self._real("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:       # the samples of n > 1 use seed, seed + 1, ..., seed + n - 1
            self.seed = self._int("seed", self.seed, lo=INT64_MIN, hi=INT64_MAX - (self.n - 1))
        self.stop = self._stop_strings(self.stop)
        self.stop_token_ids = self._stop_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_tokens is not None:
            self.max_tokens = self._int("max_tokens", self.max_tokens, lo=1)
        self.min_tokens = self._int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logprobs is not None:
            self.logprobs = self._int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        self.logit_bias = self._logit_bias(self.logit_bias)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = self._int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)

    # ------------------------------------------------------------------ helpers
    @property
    def greedy(self) -> bool:
        """True when this request samples by argmax (temperature ~ 0)."""
        return self.temperature < GREEDY_EPS

    def all_stop_token_ids(self, eos_token_ids: set[int] | frozenset[int]) -> set[int]:
        """Token ids that end this request: eos (unless ignore_eos) plus stop_token_ids."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids |= set(eos_token_ids)
        return ids

    # --------------------------------------------------------------- validation
    @staticmethod
    def _int(name, value, lo=INT64_MIN, hi=INT64_MAX, hint=None) -> int:
        ok = _is_int(value) and lo <= value <= hi
        if not ok:
            below, above = _is_int(value) and value < lo, _is_int(value) and value > hi
            parts = ([f">= {lo if lo != INT64_MIN else '-2**63'}"] if lo != INT64_MIN or below else []) + \
                    ([f"<= {hi if hi != INT64_MAX else '2**63 - 1'}"] if hi != INT64_MAX or above else [])
            bounds = " " + " and ".join(parts) if parts else ""
            raise ValueError(f"{hint or f'{name} must be an int{bounds}'}, got {value!r}")
        return int(value)

    @staticmethod
    def _real(name, value, lo, hi, lo_open=False, hint=None) -> float:
        ok = _is_real(value) and math.isfinite(value)
        if ok:
            ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            if hint is None:
                lo_s = f"{'>' if lo_open else '>='} {lo}"
                hint = f"{name} must be a finite number {lo_s}" + (f" and <= {hi}" if hi is not None else "")
            raise ValueError(f"{hint}, got {value!r}")
        return float(value)

    @staticmethod
    def _stop_strings(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str or a list of str, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        return list(stop)

    @staticmethod
    def _logit_bias(bias) -> dict[int, float] | None:
        if not bias:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}")
        out = {}
        for tid, b in bias.items():
            if isinstance(tid, str) and tid.lstrip("-").isdigit():
                tid = int(tid)                 # JSON object keys are strings
            if not _is_int(tid) or not 0 <= tid <= INT64_MAX:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {tid!r}")
            if not _is_real(b) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r}")
            out[int(tid)] = float(b)
        return out

    @staticmethod
    def _stop_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple, set, frozenset)):
            raise ValueError(f"stop_token_ids must be a list of int, got {ids!r}")
        for t in ids:
            if not _is_int(t) or not 0 <= t <= INT64_MAX:
                raise ValueError(f"stop_token_ids must contain only token ids in [0, 2**63), got {t!r}")
        return [int(t) for t in ids]
