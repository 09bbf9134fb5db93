"""`SpeculativeConfig`: vLLM's `speculative_config` ({"method": ..., "num_speculative_tokens": k, ...}).
Every error is a ValueError naming the field. No torch."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from kvflow.registry import Registry

PROPOSERS = Registry("speculative_config.method", {"ngram": "kvflow.spec.ngram"})
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1          # ngram: the shortest suffix looked up
    prompt_lookup_max: int = 4          # ngram: the longest
    num_layers: int | None = None       # layer_skip: the draft's depth (default: a quarter of the model's)
    adaptive: bool = True               # follow each request's acceptance; step aside for large batches

    def __post_init__(self):
        if self.method not in PROPOSERS:
            hint = " (a draft model is not supported yet)" if self.method == "draft_model" else ""
            raise ValueError(f"speculative_config.method must be one of {', '.join(PROPOSERS)}, "
                             f"got {self.method!r}{hint}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an int in [1, "
                             f"{MAX_SPECULATIVE_TOKENS}], got {k!r}")
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative_config.{name} must be a positive int, got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"speculative_config.num_layers must be a positive int, got {n!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be a bool, got {self.adaptive!r}")

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """From a dict, its JSON text (the command line's --speculative-config), or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown fields: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise ValueError(f"speculative_config.{name} is required")
        return cls(**value)
