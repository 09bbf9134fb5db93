"""`SpeculativeConfig`: vLLM's `speculative_config` ({"method": ..., "num_speculative_tokens": k, ...}).
Every error is a ValueError naming the field. No torch."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from kvflow.registry import Registry

PROPOSERS = Registry("speculative_config.method", {"ngram": "kvflow.spec.ngram",
                                                    "draft_model": "kvflow.spec.draft_model",
                                                    "layer_skip": "kvflow.spec.layer_skip"})
DRAFT_QUANTIZATIONS = ("int8", "int4", "gguf")      # as the target's (kvflow.config.QUANTIZATIONS)
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1          # ngram: the shortest suffix looked up
    prompt_lookup_max: int = 4          # ngram: the longest
    num_layers: int | None = None       # layer_skip: the draft's depth (default: a quarter of the model's)
    model: str | None = None            # draft_model: a Hugging Face folder or a .gguf file, same vocabulary
    quantization: str | None = None     # draft_model: the draft's weight quantization (as the target's option)
    adaptive: bool = True               # follow each request's acceptance; step aside for large batches

    def __post_init__(self):
        if self.method not in PROPOSERS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(PROPOSERS)}, got {self.method!r}")
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
        self._check_draft_model()
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be a bool, got {self.adaptive!r}")

    def _check_draft_model(self) -> None:
        if self.method != "draft_model":
            for name in ("model", "quantization"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config.{name} is for speculative_config.method 'draft_model', "
                                     f"not {self.method!r}")
            return
        if self.model is None:
            raise ValueError("speculative_config.model is required with speculative_config.method 'draft_model' "
                             "(a Hugging Face folder or a .gguf file with the target's vocabulary)")
        if not isinstance(self.model, str) or not os.path.exists(self.model):
            raise ValueError(f"speculative_config.model {self.model!r} does not exist (expected a Hugging Face "
                             f"folder or a .gguf file)")
        if self.quantization not in (None, *DRAFT_QUANTIZATIONS):
            raise ValueError(f"speculative_config.quantization must be None or one of "
                             f"{', '.join(DRAFT_QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quantization == "gguf" and not self.model.lower().endswith(".gguf"):
            raise ValueError(f"speculative_config.quantization 'gguf' keeps a GGUF file's quantized weights: "
                             f"speculative_config.model must be a .gguf file, got {self.model!r}")

    @property
    def lookahead(self) -> bool:
        """Whether the proposer writes KV at the drafted positions: the scheduler then allocates slots for the
        step's tokens plus the drafts (vLLM's num_lookahead_tokens). A model-free proposer (ngram) does not."""
        return self.method != "ngram"

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
