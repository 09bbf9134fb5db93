"""Verification of drafts: rejection sampling that keeps the target's distribution exactly (Leviathan et
al. 2023, Chen et al. 2023).

A request with drafts d_1..d_k is scored at k + 1 positions in one pass: p_0 (after the last accepted
token), p_1 (after d_1), ..., p_k. Each p_j is the target's sampling distribution at that position, with the
request's temperature, top-k, top-p, min-p, penalties (counting the drafts before it) and grammar applied,
exactly as the sampler builds it without speculation. Drafts here are deterministic (a point mass q_j at
d_{j+1}), so the rule is: accept d_{j+1} with probability p_j(d_{j+1}); at the first rejection, sample from
the residual max(0, p_j - q_j), which is p_j with d_{j+1} removed; if all k are accepted, sample one more
token from p_k. Every emitted token is then distributed as without speculation. Greedy rows accept while
the draft equals the argmax and emit the argmax where it differs: the greedy tokens, unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvflow.sampling.params import GREEDY_EPS
from kvflow.sampling.sampler import Sampler, SamplerOutput, SamplingBatch, make_output, race


def verify(logits: Tensor, batch: SamplingBatch, groups: list[tuple[int, list[int], torch.Generator | None]]
           ) -> tuple[list[list[int]], list[list[int]], SamplerOutput]:
    """`logits` [R, V]: the verified positions of every group, consecutive. `groups`: per request (its first
    row, its drafts, its seeded generator or None). Returns per group the emitted tokens and the rows they
    were emitted at, and a SamplerOutput over all rows whose logprobs entries (for the emitted tokens, at
    their rows) the caller picks."""
    processed, raw_logprobs = Sampler.process(logits, batch)
    greedy_ids = processed.argmax(dim=-1)
    probs = None if batch.all_greedy else Sampler.probs(processed, batch)
    greedy = (batch.temperature < GREEDY_EPS).tolist()
    argmax = greedy_ids.tolist()
    chosen = list(argmax)                        # the token emitted at each row (for its logprobs)
    tokens, rows = [], []
    for first, drafts, gen in groups:
        out = []
        for j in range(len(drafts) + 1):
            r = first + j
            if greedy[r]:
                tok = argmax[r]
            elif j == len(drafts):               # every draft accepted: one more from p_k
                tok = int(race(probs[r:r + 1].clone(), {0: gen} if gen is not None else {})[0])
            else:
                d = drafts[j]
                p = probs[r]
                accept_p = float(p[d] / p.sum())
                u = float(torch.rand(1, generator=gen)) if gen is not None else float(torch.rand(1))
                if u < accept_p:
                    tok = d
                else:                            # the residual: p without the rejected draft
                    residual = p.clone()
                    residual[d] = 0.0
                    tok = d if float(residual.sum()) <= 0 else \
                        int(race(residual.unsqueeze(0), {0: gen} if gen is not None else {})[0])
            out.append(tok)
            chosen[r] = tok
            if j < len(drafts) and tok != drafts[j]:
                break
        tokens.append(out)
        rows.append(list(range(first, first + len(out))))
    sampled = make_output(torch.tensor(chosen, dtype=torch.int64), raw_logprobs, batch)
    return tokens, rows, sampled
