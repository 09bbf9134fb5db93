"""Prompt lookup (n-gram) drafting: find the last n tokens (n from prompt_lookup_max down to
prompt_lookup_min) earlier in the request's tokens, most recent match first, and propose what followed
them. Costs no model work: useful where the output copies from the input (editing, extraction, code)."""
from __future__ import annotations

import numpy as np

from kvflow.spec.base import DraftRequest, Proposer
from kvflow.spec.config import PROPOSERS


def lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """The up-to-k tokens that followed the latest earlier occurrence of the longest suffix (n_max .. n_min
    tokens) of `tokens`; [] when none occurs."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)   # starts 0 .. L-1-n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n            # what followed the latest match
            return tokens[start:start + k].tolist()
    return []


@PROPOSERS.register("ngram")
class NgramProposer(Proposer):
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        c = self.config
        return [lookup(np.asarray(r.token_ids, dtype=np.int64), c.prompt_lookup_min, c.prompt_lookup_max,
                       r.num_tokens) if r.num_tokens > 0 else [] for r in requests]
