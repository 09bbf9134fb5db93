"""Turns a scheduled step into tensors, runs the model once over the flat batch, and samples.

Single-token rows (decodes) are laid out first so attention can batch them in one call; then each
multi-token row (prompt chunk). Logits are computed only for rows that end at their last known
token, i.e. the rows that sample this step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvflow.attention.metadata import AttentionMetadata, PrefillSeq
from kvflow.config import ModelConfig
from kvflow.models.llama import LlamaForCausalLM
from kvflow.request import Request
from kvflow.sampling.sampler import Sampler, SamplingBatch
from kvflow.scheduler.scheduler import ScheduledBatch


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor      # rows of the hidden states that sample
    sampling_requests: list[Request]  # in the order of logits_indices


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, dtype: torch.dtype, device: str,
                 num_blocks: int, block_size: int):
        self.model, self.cfg, self.device, self.block_size = model, cfg, device, block_size
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # zero-initialised: padded reads of unused slots must be finite (they are masked out)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        for layer, k, v in zip(model.layers, self.k_caches, self.v_caches):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v
        self.sampler = Sampler()

    def kv_tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds KV-cache state, each indexed by block id on dim 0 (copying block b
        of each of them copies the block's whole content)."""
        return self.k_caches + self.v_caches

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs, dev = self.block_size, self.device
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_tables, decode_lens, prefills, logits_indices, sampling = [], [], [], [], []
        for i in order:
            req, n = batch.requests[i], batch.num_new_tokens[i]
            start = req.num_computed_tokens
            ctx_len = start + n
            table = np.fromiter((b.block_id for b in req.block_table), dtype=np.int64, count=len(req.block_table))
            pos = np.arange(start, ctx_len, dtype=np.int64)
            flat_start = len(ids)
            ids.extend(req.all_token_ids[start:ctx_len])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(ctx_len)
            elif start == 0:
                prefills.append(PrefillSeq(flat_start, n, ctx_len, None, None))
            else:                      # part of its context is cached: attend to it through the blocks
                mask = torch.arange(ctx_len).unsqueeze(0) <= torch.arange(start, ctx_len).unsqueeze(1)
                prefills.append(PrefillSeq(flat_start, n, ctx_len, torch.from_numpy(table[:-(-ctx_len // bs)]).to(dev),
                                           mask.to(dev)))
            if ctx_len == req.num_tokens:
                logits_indices.append(len(ids) - 1)
                sampling.append(req)
        nd = len(decode_tables)
        decode_bt = decode_mask = None
        if nd:
            max_blocks = max(len(t) for t in decode_tables)
            bt = np.zeros((nd, max_blocks), dtype=np.int64)
            for r, t in enumerate(decode_tables):
                bt[r, :len(t)] = t
            decode_bt = torch.from_numpy(bt).to(dev)
            lens = torch.tensor(decode_lens)
            decode_mask = (torch.arange(max_blocks * bs).unsqueeze(0) < lens.unsqueeze(1)).view(nd, 1, 1, -1).to(dev)
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            num_decodes=nd, decode_block_tables=decode_bt, decode_mask=decode_mask, prefills=prefills)
        return StepInputs(torch.tensor(ids, device=dev), torch.from_numpy(np.concatenate(positions)).to(dev), attn,
                          torch.tensor(logits_indices, dtype=torch.int64, device=dev), sampling)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Run one step. Returns, per request of the batch, its sampled token (None if it did not sample)."""
        inp = self.prepare(batch)
        hidden = self.model(inp.input_ids, inp.positions, inp.attn)
        sampled: list[int | None] = [None] * len(batch)
        if not inp.sampling_requests:
            return sampled
        logits = self.model.compute_logits(hidden[inp.logits_indices])   # the sampler works in fp32
        reqs = inp.sampling_requests
        sb = SamplingBatch.build([r.params for r in reqs], [r.prompt_token_ids for r in reqs],
                                 [r.output_token_ids for r in reqs], [r.generator for r in reqs],
                                 [r.stop_ids for r in reqs], logits.shape[-1], device=logits.device)
        out = self.sampler(logits, sb)
        index = {id(r): i for i, r in enumerate(batch.requests)}
        for j, req in enumerate(reqs):
            sampled[index[id(req)]] = out.token_ids[j]
            if req.logprobs is not None and out.logprobs is not None:
                req.logprobs.append((out.logprobs[j], out.ranks[j]))
        return sampled
