"""Output-length prediction (survey section 3.4): the interface every predictor implements, the estimate
it returns, and the registry that opens one by name or file.

A predictor turns what is known of a request (its prompt length, its client, and features of the model's
own activations) into a `LengthEstimate`: a probability per output-length bucket. The scheduler's policies
(`sjf`, `mlfq`) and, later, the cluster router rank requests by it; as tokens are generated the remaining
length is re-estimated from the same distribution, conditioned on the length reached.

Features (numpy float32 vectors of the model's hidden size), computed by the engine core:
  "embed":  the mean of the prompt's input embeddings (before the prefill: costs a table lookup);
  "hidden": the final hidden state of the last prompt token (after the prefill, which computes it anyway).
A predictor lists the ones it reads in `features`; `predict` is called once when the request arrives (with
"embed" only) and again when its prefill completes (with both), if it reads "hidden".

This module imports neither torch nor the model stack.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from kvflow.registry import Registry

# bucket edges, in output tokens: bucket i holds lengths in [EDGES[i], EDGES[i + 1])
EDGES: tuple[float, ...] = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, math.inf)


@dataclass
class LengthEstimate:
    """A distribution over a request's output length, as bucket probabilities over `edges`."""
    probs: list[float]
    edges: tuple[float, ...] = EDGES

    def __post_init__(self):
        if len(self.probs) != len(self.edges) - 1:
            raise ValueError(f"a length estimate needs {len(self.edges) - 1} bucket probabilities, got {len(self.probs)}")

    @classmethod
    def point(cls, length: float, edges: tuple[float, ...] = EDGES) -> LengthEstimate:
        """All mass in the bucket that holds `length`."""
        probs = [0.0] * (len(edges) - 1)
        probs[bucket_of(length, edges)] = 1.0
        return cls(probs, edges)

    def _centers(self, lo: float, cap: float) -> list[tuple[float, float]]:
        """(probability, mean length) of each bucket's part above `lo`, with lengths uniform within a bucket
        (an open last bucket [a, inf) counts as [a, 2a)) and clipped to `cap`."""
        out = []
        for p, a, b in zip(self.probs, self.edges, self.edges[1:]):
            b = 2 * a if math.isinf(b) else b
            if p <= 0 or b <= lo:
                continue
            a2 = max(a, lo)
            out.append((p * (b - a2) / (b - a), min((a2 + b) / 2, cap)))
        return out

    def mean(self, cap: float = math.inf) -> float:
        """Expected output length (lengths clipped to `cap`, e.g. max_tokens)."""
        return self.remaining(0, cap)

    def remaining(self, generated: int, cap: float = math.inf) -> float:
        """Expected tokens still to come, given that `generated` have been and the request has not ended:
        the distribution conditioned on a length above `generated`, clipped to `cap`."""
        parts = self._centers(generated, cap)
        mass = sum(p for p, _ in parts)
        if mass <= 0:                      # outlived every bucket it was given: assume as much again
            return max(min(cap, 2 * max(generated, 1)) - generated, 1.0)
        return max(sum(p * m for p, m in parts) / mass - generated, 1.0)

    def bucket(self) -> int:
        """The most probable bucket."""
        return int(np.argmax(self.probs))


def bucket_of(length: float, edges: tuple[float, ...] = EDGES) -> int:
    """The bucket that holds `length` (lengths below the first edge go to the first bucket)."""
    for i in range(len(edges) - 1):
        if length < edges[i + 1]:
            return i
    return len(edges) - 2


class LengthPredictor:
    """Predicts output lengths. Subclasses set `name` and `features` and override `predict`; online ones
    learn from `observe`."""
    name = ""
    features: tuple[str, ...] = ()           # model features read: "embed", "hidden"

    def predict(self, prompt_len: int, client: str | None, features: dict[str, np.ndarray]) -> LengthEstimate:
        raise NotImplementedError

    def observe(self, prompt_len: int, client: str | None, output_len: int) -> None:
        """A request ended by itself (a stop token or string, not max_tokens or an abort) after
        `output_len` tokens."""


# predictor name -> the module that registers it; a learned predictor is opened from its file instead
PREDICTORS = Registry("length_predictor", {"online": "kvflow.predict.online"})
register_predictor = PREDICTORS.register


def make_predictor(spec: str | None, model_identity: dict | None = None) -> LengthPredictor:
    """`None` or "online": the online predictor (no training); a path: a learned predictor's file, checked
    against the model it was trained for (`model_identity`). ValueError / FileNotFoundError naming it."""
    if spec is None or spec in PREDICTORS:
        return PREDICTORS.get(spec or "online")()
    from kvflow.predict.learned import LearnedPredictor
    return LearnedPredictor.load(spec, model_identity)


def frontend_predictor(predictor: LengthPredictor) -> LengthPredictor:
    """What a frontend (the router, the admission check) predicts with: `predictor` when it reads no model
    features (those are computed inside an engine core), else the online one, which learns from the lengths
    of finished requests."""
    return predictor if not predictor.features else make_predictor(None)


def model_identity(model_path: str, arch) -> dict:
    """What a learned predictor file records of the model it was trained on, and is checked against:
    the model file's name and the architecture's shape (`arch`: a kvflow.models.arch.ModelConfig)."""
    return {"model": os.path.basename(os.path.normpath(model_path)), "model_type": arch.model_type,
            "hidden_size": arch.hidden_size, "num_layers": arch.num_layers, "vocab_size": arch.vocab_size}
