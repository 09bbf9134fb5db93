"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeded rows, logprobs.

The model runner builds one `SamplingBatch` per step (`SamplingBatch.build`) and calls
`Sampler()(logits, batch)`. Every stage is a tensor op over the whole batch; stages no
row needs are skipped (their tensors are None). Order, as in vLLM:
grammar mask (structured output) -> raw logprobs -> logit_bias -> min_tokens stop masking
-> repetition / frequency / presence penalties -> greedy argmax | (temperature -> top-k -> top-p -> softmax -> min-p -> exponential race).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kvflow.sampling.params import GREEDY_EPS, SamplingParams
from kvflow.structured.backend import bitmask_words


@dataclass
class SamplingBatch:
    vocab_size: int
    temperature: Tensor                      # [B] fp32; 0 marks greedy rows
    all_greedy: bool = False
    all_random: bool = True
    top_k: Tensor | None = None              # [B] int64; 0 = off for that row
    top_p: Tensor | None = None              # [B] fp32; 1.0 = off
    min_p: Tensor | None = None              # [B] fp32; 0.0 = off
    presence_penalty: Tensor | None = None   # [B] fp32
    frequency_penalty: Tensor | None = None  # [B] fp32
    repetition_penalty: Tensor | None = None  # [B] fp32
    output_counts: Tensor | None = None      # [B, V] fp32 count of each token in the output
    seen_mask: Tensor | None = None          # [B, V] bool: token in prompt or output
    suppress_rows: Tensor | None = None      # [K] int64 } logits[rows, cols] = -inf
    suppress_cols: Tensor | None = None      # [K] int64 } (stop ids while < min_tokens)
    bias_rows: Tensor | None = None          # [K] int64 } logits[rows, cols] += values
    bias_cols: Tensor | None = None          # [K] int64 } (logit_bias)
    bias_values: Tensor | None = None        # [K] fp32  }
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # seeded random rows
    num_logprobs: list[int | None] | None = None  # per row; None when no row asks
    grammar_blocked: Tensor | None = None    # [B, V] bool: tokens a row's grammar does not allow next
    max_num_logprobs: int = 0

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]],
              output_ids: list[list[int]], generators: list[torch.Generator | None],
              stop_ids: list[set[int]], vocab_size: int,
              device: torch.device | str = "cpu", bitmasks: list[bytes | None] | None = None) -> "SamplingBatch":
        B = len(params)
        for name, seq in (("prompt_ids", prompt_ids), ("output_ids", output_ids),
                          ("generators", generators), ("stop_ids", stop_ids)):
            if len(seq) != B:
                raise ValueError(f"{name} has {len(seq)} rows but params has {B}")
        if B == 0:
            raise ValueError("params must not be empty")
        greedy = [p.greedy for p in params]
        f32 = dict(dtype=torch.float32, device=device)
        b = cls(vocab_size=vocab_size, all_greedy=all(greedy), all_random=not any(greedy),
                temperature=torch.tensor([0.0 if g else p.temperature for p, g in zip(params, greedy)], **f32))

        # Truncation settings only matter for random rows.
        rand = [(p, not g) for p, g in zip(params, greedy)]
        if any(r and 0 < p.top_k < vocab_size for p, r in rand):
            b.top_k = torch.tensor([p.top_k if r and p.top_k < vocab_size else 0 for p, r in rand],
                                   dtype=torch.int64, device=device)
        if any(r and p.top_p < 1.0 for p, r in rand):
            b.top_p = torch.tensor([p.top_p if r else 1.0 for p, r in rand], **f32)
        if any(r and p.min_p > 0.0 for p, r in rand):
            b.min_p = torch.tensor([p.min_p if r else 0.0 for p, r in rand], **f32)

        # Penalties apply to greedy rows too. Only rows that use them contribute token ids.
        use_rep = [p.repetition_penalty != 1.0 for p in params]
        use_out = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        if any(use_out) or any(use_rep):
            counts = _bincount_rows([o if u or r else [] for o, u, r in zip(output_ids, use_out, use_rep)],
                                    vocab_size, device)
            if any(use_out):
                b.output_counts = counts
                b.presence_penalty = torch.tensor([p.presence_penalty for p in params], **f32)
                b.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], **f32)
            if any(use_rep):
                prompt = _bincount_rows([pr if r else [] for pr, r in zip(prompt_ids, use_rep)],
                                        vocab_size, device)
                b.seen_mask = (prompt > 0) | (counts > 0)
                b.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], **f32)

        if bitmasks is not None and any(m is not None for m in bitmasks):
            b.grammar_blocked = torch.from_numpy(blocked_tokens(bitmasks, vocab_size)).to(device)

        # min_tokens holds back the stop ids; not under a grammar, which alone says when the output may end
        rows, cols = [], []
        for i, (p, out, ids) in enumerate(zip(params, output_ids, stop_ids)):
            if len(out) < p.min_tokens and not (bitmasks and bitmasks[i] is not None):
                valid = [t for t in ids if 0 <= t < vocab_size]
                rows += [i] * len(valid)
                cols += valid
        if rows:
            b.suppress_rows = torch.tensor(rows, dtype=torch.int64, device=device)
            b.suppress_cols = torch.tensor(cols, dtype=torch.int64, device=device)

        rows, cols, vals = [], [], []
        for i, p in enumerate(params):
            for tid, v in (p.logit_bias or {}).items():
                if tid < vocab_size:
                    rows.append(i), cols.append(tid), vals.append(v)
        if rows:
            b.bias_rows = torch.tensor(rows, dtype=torch.int64, device=device)
            b.bias_cols = torch.tensor(cols, dtype=torch.int64, device=device)
            b.bias_values = torch.tensor(vals, **f32)

        b.generators = {i: g for i, g in enumerate(generators) if g is not None and not greedy[i]}
        if any(p.logprobs is not None for p in params):
            b.num_logprobs = [p.logprobs for p in params]
            b.max_num_logprobs = max(n for n in b.num_logprobs if n is not None)
        return b


def _bincount_rows(rows: list[list[int]], vocab_size: int, device) -> Tensor:
    """[B, V] fp32 counts of each token id per row (ids outside [0, V) are ignored)."""
    B, L = len(rows), max(len(r) for r in rows)
    counts = torch.zeros(B, vocab_size + 1, dtype=torch.float32, device=device)
    if L:
        idx = torch.tensor([r + [vocab_size] * (L - len(r)) for r in rows], dtype=torch.int64, device=device)
        idx = torch.where((idx < 0) | (idx > vocab_size), vocab_size, idx)
        counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]


@dataclass
class SamplerOutput:
    token_ids: list[int]                                    # [B] sampled ids
    # Per row that asked: [(sampled id, logprob), then top-N (id, logprob) descending]; else None.
    logprobs: list[list[tuple[int, float]] | None] | None = None
    ranks: list[int | None] | None = None                   # 1-based rank of the sampled token


class Sampler:
    """Stateless; call as `Sampler()(logits, batch)`. Does not modify `logits`."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits, raw_logprobs = self.process(logits, batch)
        greedy_ids = None if batch.all_random else logits.argmax(dim=-1)
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            token_ids = race(self.probs(logits, batch), batch.generators)
            if greedy_ids is not None:
                token_ids = torch.where(batch.temperature < GREEDY_EPS, greedy_ids, token_ids)
        return make_output(token_ids, raw_logprobs, batch)

    @staticmethod
    def process(logits: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor | None]:
        """(fp32 logits after the grammar mask, bias, min_tokens masking and penalties; the raw logprobs
        (after the grammar mask only) when a row asks for logprobs)."""
        if logits.dim() != 2 or logits.shape[0] != batch.temperature.shape[0]:
            raise ValueError(f"logits must be [B={batch.temperature.shape[0]}, V], got {tuple(logits.shape)}")
        if logits.shape[1] != batch.vocab_size:
            raise ValueError(f"logits vocab size {logits.shape[1]} != batch.vocab_size {batch.vocab_size}")
        logits = logits.to(torch.float32, copy=True)
        if batch.grammar_blocked is not None:
            logits.masked_fill_(batch.grammar_blocked, float("-inf"))
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs is not None else None

        if batch.bias_rows is not None:
            logits.index_put_((batch.bias_rows, batch.bias_cols), batch.bias_values, accumulate=True)
        if batch.suppress_rows is not None:
            logits[batch.suppress_rows, batch.suppress_cols] = float("-inf")
        return apply_penalties(logits, batch), raw_logprobs

    @staticmethod
    def probs(logits: Tensor, batch: SamplingBatch) -> Tensor:
        """The distribution each row samples from, from processed logits (modified in place): temperature
        (greedy rows at 1), top-k, top-p, softmax, min-p (not renormalised: the race needs no sum of 1)."""
        temp = batch.temperature
        temp = torch.where(temp < GREEDY_EPS, torch.ones_like(temp), temp)
        logits.div_(temp.unsqueeze(1))
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = torch.softmax(logits, dim=-1)
        if batch.min_p is not None:
            threshold = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            probs.masked_fill_(probs < threshold, 0.0)   # the max always survives
        return probs


def race(probs: Tensor, generators: dict[int, torch.Generator]) -> Tensor:
    """Exponential race: argmax(p / E), E ~ Exp(1), picks index i with probability p_i / sum(p) per row; row
    i draws from generators[i] when it has one. Modifies `probs`."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for i, gen in generators.items():
        q[i].exponential_(generator=gen)
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def blocked_tokens(bitmasks: list[bytes | None], vocab_size: int) -> np.ndarray:
    """[B, V] bool from per-row token bitmasks (int32 little-endian words, bit i of word i // 32 = token i
    allowed; None = no constraint): True where the token is not allowed. One numpy unpack for the batch."""
    words = bitmask_words(vocab_size)
    packed = np.full((len(bitmasks), 4 * words), 0xFF, dtype=np.uint8)
    for i, m in enumerate(bitmasks):
        if m is not None:
            packed[i] = np.frombuffer(m, dtype=np.uint8, count=4 * words)
    return np.unpackbits(packed, axis=1, bitorder="little")[:, :vocab_size] == 0


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (prompt+output), then frequency and presence (output only) penalties."""
    if batch.repetition_penalty is not None:
        pen = torch.where(batch.seen_mask, batch.repetition_penalty.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / pen, logits * pen)
    if batch.output_counts is not None:
        logits -= batch.frequency_penalty.unsqueeze(1) * batch.output_counts
        logits -= batch.presence_penalty.unsqueeze(1) * (batch.output_counts > 0).float()
    return logits


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask (to -inf) tokens outside each row's top-k / top-p set. top_k 0 and top_p 1.0 = off."""
    if top_k is None and top_p is None:
        return logits
    V = logits.shape[1]
    if top_p is None:  # top-k only: one topk with the batch's largest k, no full sort
        off = top_k <= 0
        k = torch.where(off, 1, top_k.clamp(max=V))
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        kth.masked_fill_(off.unsqueeze(1), float("-inf"))
        return logits.masked_fill_(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1)       # ascending
    if top_k is not None:
        k = torch.where(top_k <= 0, V, top_k.clamp(max=V))
        kth = sorted_logits.gather(1, (V - k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False                              # always keep the most likely token
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def make_output(token_ids: Tensor, raw_logprobs: Tensor | None, batch: SamplingBatch) -> SamplerOutput:
    ids = token_ids.tolist()
    if raw_logprobs is None:
        return SamplerOutput(token_ids=ids)
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = ((raw_logprobs > sampled).sum(dim=-1) + 1).tolist()
    sampled = sampled.squeeze(1).tolist()
    top_vals, top_ids = ([], [])
    n_top = min(batch.max_num_logprobs, raw_logprobs.shape[1])
    if n_top > 0:
        top = raw_logprobs.topk(n_top, dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    logprobs, out_ranks = [], []
    for i, n in enumerate(batch.num_logprobs):
        if n is None:
            logprobs.append(None)
            out_ranks.append(None)
            continue
        row = [(ids[i], sampled[i])]
        if n:
            row += list(zip(top_ids[i][:n], top_vals[i][:n]))
        logprobs.append(row)
        out_ranks.append(ranks[i])
    return SamplerOutput(token_ids=ids, logprobs=logprobs, ranks=out_ranks)
