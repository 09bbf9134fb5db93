"""The online output-length predictor: no training, no model features, learns while it serves.

It keeps decayed histograms, over the buckets of base.EDGES, of the output lengths it has observed:
  - per (client, prompt-length bucket),
  - per client (the OpenAI `user` field; None = no client, which has no per-client histograms),
  - per prompt-length bucket (PROMPT_EDGES),
  - globally.
`predict` answers from the most specific of these that has seen enough requests (`min_obs`, counted
with the decay), else the next one, else a broad prior (mass spread evenly over 16..512 tokens). The
chosen histogram is smoothed with a little of the prior, so no bucket is ever impossible.

Every observation first multiplies a histogram's counts by `decay`, so old requests fade (a window of
about 1 / (1 - decay) requests) and the predictor follows a workload that changes. The number of
clients remembered is bounded (least recently seen forgotten first).

Torch-free (numpy only).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from kvflow.predict.base import EDGES, LengthEstimate, LengthPredictor, bucket_of, register_predictor

# prompt-length buckets, in prompt tokens
PROMPT_EDGES: tuple[float, ...] = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, math.inf)


def broad_prior(edges: tuple[float, ...] = EDGES, lo: float = 16, hi: float = 512) -> np.ndarray:
    """Probabilities spread evenly over the buckets that lie inside [lo, hi)."""
    p = np.array([1.0 if a >= lo and b <= hi else 0.0 for a, b in zip(edges, edges[1:])])
    if p.sum() == 0:
        p[:] = 1.0
    return p / p.sum()


class DecayedHistogram:
    """Counts per bucket, each observation weighing 1 and every older one `decay` times less."""

    def __init__(self, num_buckets: int, decay: float):
        self.counts = np.zeros(num_buckets)
        self.decay = decay

    @property
    def weight(self) -> float:
        """The (decayed) number of observations."""
        return float(self.counts.sum())

    def add(self, bucket: int) -> None:
        self.counts *= self.decay
        self.counts[bucket] += 1.0


@register_predictor("online")
class OnlinePredictor(LengthPredictor):
    """Decayed histograms of observed output lengths, per client, per prompt-length bucket and globally."""
    features = ()

    def __init__(self, edges: tuple[float, ...] = EDGES, decay: float = 0.995, min_obs: float = 8.0,
                 prior_weight: float = 1.0, prompt_edges: tuple[float, ...] = PROMPT_EDGES,
                 max_clients: int = 10000):
        self.edges, self.prompt_edges = tuple(edges), tuple(prompt_edges)
        self.decay, self.min_obs, self.prior_weight, self.max_clients = decay, min_obs, prior_weight, max_clients
        self.prior = broad_prior(self.edges)
        k = len(self.edges) - 1
        self.global_hist = DecayedHistogram(k, decay)
        self.by_prompt = [DecayedHistogram(k, decay) for _ in range(len(self.prompt_edges) - 1)]
        # client -> (its histogram, its histograms per prompt-length bucket), least recently seen first
        self.by_client: OrderedDict[str, tuple[DecayedHistogram, list[DecayedHistogram]]] = OrderedDict()

    def _levels(self, prompt_len: int, client: str | None) -> list[DecayedHistogram]:
        """The histograms that apply to a request, most specific first (only those that exist)."""
        pb = bucket_of(prompt_len, self.prompt_edges)
        levels = []
        if client is not None and client in self.by_client:
            hist, per_prompt = self.by_client[client]
            levels += [per_prompt[pb], hist]
        return levels + [self.by_prompt[pb], self.global_hist]

    def histogram_for(self, prompt_len: int, client: str | None) -> DecayedHistogram | None:
        """The histogram `predict` answers from (None: the prior)."""
        return next((h for h in self._levels(prompt_len, client) if h.weight >= self.min_obs), None)

    def predict(self, prompt_len: int, client: str | None, features: dict[str, np.ndarray]) -> LengthEstimate:
        hist = self.histogram_for(prompt_len, client)
        if hist is None:
            return LengthEstimate(self.prior.tolist(), self.edges)
        probs = hist.counts + self.prior_weight * self.prior
        return LengthEstimate((probs / probs.sum()).tolist(), self.edges)

    def observe(self, prompt_len: int, client: str | None, output_len: int) -> None:
        b = bucket_of(output_len, self.edges)
        pb = bucket_of(prompt_len, self.prompt_edges)
        self.global_hist.add(b)
        self.by_prompt[pb].add(b)
        if client is None:
            return
        entry = self.by_client.get(client)
        if entry is None:
            k = len(self.edges) - 1
            entry = self.by_client[client] = (DecayedHistogram(k, self.decay),
                                              [DecayedHistogram(k, self.decay) for _ in self.by_prompt])
            if len(self.by_client) > self.max_clients:
                self.by_client.popitem(last=False)
        else:
            self.by_client.move_to_end(client)
        entry[0].add(b)
        entry[1][pb].add(b)
