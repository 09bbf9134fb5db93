"""Turns a scheduled step into tensors, runs the model once over the flat batch, and samples.

Single-token rows (decodes) are laid out first so attention can batch them in one call; then each
multi-token row (prompt chunk). Logits are computed only for rows that end at their last known
token, i.e. the rows that sample this step, and for the prompt positions of requests that asked for
prompt logprobs (in slices, so a long chunk never holds [tokens, vocab] logits at once).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvflow.attention.metadata import AttentionMetadata, PrefillSeq
from kvflow.config import ModelConfig
from kvflow.models.llama import LlamaForCausalLM, expose_submodules
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
    # rows that want prompt logprobs: (request, first flat row, number of rows, first position)
    prompt_logprob_rows: list[tuple[Request, int, int, int]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, dtype: torch.dtype, device: str,
                 num_blocks: int, block_size: int, kv_cache_dtype: str = "auto"):
        self.model, self.cfg, self.device, self.block_size = model, cfg, device, block_size
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        cache_dtype = torch.int8 if kv_cache_dtype == "int8" else dtype
        # zero-initialised: padded reads of unused slots must be finite (they are masked out)
        self.k_caches = [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(cfg.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(cfg.num_layers)]
        # int8: one scale per (slot, kv head) for K and for V, in the compute dtype (attention/cpu.py)
        self.k_scales: list[torch.Tensor] = []
        self.v_scales: list[torch.Tensor] = []
        if kv_cache_dtype == "int8":
            self.k_scales = [torch.zeros(shape[:3], dtype=dtype, device=device) for _ in range(cfg.num_layers)]
            self.v_scales = [torch.zeros(shape[:3], dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        for i, (layer, k, v) in enumerate(zip(model.layers, self.k_caches, self.v_caches)):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k, v
            if self.k_scales:
                layer.self_attn.k_scale, layer.self_attn.v_scale = self.k_scales[i], self.v_scales[i]
        expose_submodules(model)
        self.sampler = Sampler()
        self.kv_store = None              # DiskKVStore, when the disk tier is on

    def kv_tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds KV-cache state, each indexed by block id on dim 0 (copying block b
        of each of them copies the block's whole content)."""
        return self.k_caches + self.v_caches + self.k_scales + self.v_scales

    # ---- moving blocks: copy-on-write, swap tier ------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.kv_tensors())

    def allocate_swap(self, num_blocks: int) -> None:
        """The swap tier: host-memory tensors shaped like the KV cache's (pinned beside a GPU). torch.empty:
        pages are committed only when a block is swapped into them."""
        pin = str(self.device).startswith("cuda")
        self.swap_tensors = [torch.empty((num_blocks, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                             for t in self.kv_tensors()] if num_blocks else []

    def measure_swap_bandwidth(self, num_blocks: int = 4) -> float:
        """Bytes/s of moving blocks out to the swap tier and back (the preemption cost model's rate)."""
        n = min(num_blocks, len(self.swap_tensors[0]) if self.swap_tensors else 0, len(self.k_caches[0]))
        if n == 0:
            return 4e9
        ids = list(range(n))
        t0 = time.perf_counter()
        self.apply_block_ops([("out", i, i) for i in ids] + [("in", i, i) for i in ids])
        return 2 * n * self.block_bytes / max(time.perf_counter() - t0, 1e-6)

    def apply_block_ops(self, ops: list[tuple]) -> None:
        """Apply the scheduler's block moves in order (consecutive moves of one kind in one copy per tensor):
        "copy" device -> device, "out" device -> swap tier, "in" swap tier -> device, "spill" a block to
        the disk tier (a host copy, written by its thread), "load" a block from it."""
        kv = self.kv_tensors()
        for kind, group in itertools.groupby(ops, key=lambda op: op[0]):
            group = list(group)
            if kind == "spill":
                for _, b, h in group:
                    self.kv_store.save_async(h, self.read_block(b))
                continue
            if kind == "load":
                for _, b, tensors in group:
                    for t, x in zip(kv, tensors):
                        t[b].copy_(x)
                continue
            src = torch.tensor([op[1] for op in group], dtype=torch.int64)
            dst = torch.tensor([op[2] for op in group], dtype=torch.int64)
            if kind == "copy":
                src, dst = src.to(self.device), dst.to(self.device)
                for t in kv:
                    t.index_copy_(0, dst, t.index_select(0, src))
            elif kind == "out":
                src = src.to(self.device)
                for t, host in zip(kv, self.swap_tensors):
                    host.index_copy_(0, dst, t.index_select(0, src).to("cpu"))
            elif kind == "in":
                dst = dst.to(self.device)
                for t, host in zip(kv, self.swap_tensors):
                    t.index_copy_(0, dst, host.index_select(0, src).to(self.device))
            else:
                raise ValueError(f"unknown block op {kind!r}")

    def block_spec(self) -> list[list]:
        """Shape and dtype of one block of each KV tensor (what a disk-tier file must hold)."""
        return [[list(t.shape[1:]), str(t.dtype).removeprefix("torch.")] for t in self.kv_tensors()]

    def read_block(self, block_id: int) -> list[torch.Tensor]:
        return [t[block_id].to("cpu", copy=True) for t in self.kv_tensors()]

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs, dev = self.block_size, self.device
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_tables, decode_lens, prefills, logits_indices, sampling, prompt_rows = [], [], [], [], [], []
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
            if req.needs_prompt_logprobs:  # positions whose next token is a prompt token not yet covered
                lo, hi = max(start, req.num_prompt_logprobs - 1), min(ctx_len, len(req.prompt_token_ids) - 1)
                if hi > lo:
                    prompt_rows.append((req, flat_start + lo - start, hi - lo, lo))
        nd = len(decode_tables)
        decode_bt = decode_lens_t = None
        if nd:
            max_blocks = max(len(t) for t in decode_tables)
            bt = np.zeros((nd, max_blocks), dtype=np.int64)
            for r, t in enumerate(decode_tables):
                bt[r, :len(t)] = t
            decode_bt = torch.from_numpy(bt).to(dev)
            decode_lens_t = torch.tensor(decode_lens, dtype=torch.int64, device=dev)
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            num_decodes=nd, decode_block_tables=decode_bt, decode_context_lens=decode_lens_t, prefills=prefills)
        return StepInputs(torch.tensor(ids, device=dev), torch.from_numpy(np.concatenate(positions)).to(dev), attn,
                          torch.tensor(logits_indices, dtype=torch.int64, device=dev), sampling, prompt_rows)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Run one step. Returns, per request of the batch, its sampled token (None if it did not sample)."""
        self.apply_block_ops(batch.block_ops)
        inp = self.prepare(batch)
        hidden = self.model(inp.input_ids, inp.positions, inp.attn)
        sampled: list[int | None] = [None] * len(batch)
        for req, row, count, pos in inp.prompt_logprob_rows:
            targets = req.prompt_token_ids[pos + 1:pos + 1 + count]
            entries = self.prompt_logprobs(hidden[row:row + count], targets, req.params.prompt_logprobs)
            req.new_prompt_logprobs = (req.new_prompt_logprobs or []) + entries
            req.num_prompt_logprobs = pos + 1 + count
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

    PROMPT_LOGPROBS_ROWS = 256         # logits rows at a time: [256, vocab] fp32 is ~50 MB for a 49k vocab

    def prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], k: int) -> list:
        """Logprobs of the prompt tokens `targets` from the hidden states of the positions before them,
        log_softmax in fp32. Per token: ([(token, logprob), then the top-k (id, logprob)], rank of the token)."""
        out = []
        tgt = torch.tensor(targets, dtype=torch.int64, device=hidden.device)
        for s in range(0, len(targets), self.PROMPT_LOGPROBS_ROWS):
            t = tgt[s:s + self.PROMPT_LOGPROBS_ROWS]
            lp = torch.log_softmax(self.model.compute_logits(hidden[s:s + len(t)]).float(), dim=-1)
            tok_lp = lp.gather(1, t.unsqueeze(1))
            ranks = ((lp > tok_lp).sum(dim=-1) + 1).tolist()
            tok_lp = tok_lp.squeeze(1).tolist()
            top_ids = top_lps = None
            if k:
                top = lp.topk(min(k, lp.shape[1]), dim=-1)
                top_ids, top_lps = top.indices.tolist(), top.values.tolist()
            for j, tid in enumerate(t.tolist()):
                row = [(tid, tok_lp[j])]
                if k:
                    row += list(zip(top_ids[j], top_lps[j]))
                out.append((row, ranks[j]))
        return out
