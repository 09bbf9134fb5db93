"""Turns a `SchedulerOutput` into tensors, runs the model once over the flat batch, samples, and returns a
`RunnerOutput` (kvflow/step.py). It never sees a `Request`: it keeps what it needs per request id (token
ids, block table, sampling parameters and seeded generator, prompt-logprob progress) and forgets a request
when the scheduler lists it as finished.

Single-token rows (decodes) are laid out first so attention can batch them in one call, and with them the
tokens of a request verifying drafts, one row each; then each multi-token row (prompt chunk). Logits are
computed only for rows that sample this step, and for the prompt positions of requests that asked for
prompt logprobs (in slices, so a long chunk never holds [tokens, vocab] logits at once).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvflow.attention.metadata import AttentionMetadata, PrefillSeq
from kvflow.engine.block_ops import apply_block_ops
from kvflow.models.arch import ModelConfig
from kvflow.models.llama import expose_submodules
from kvflow.sampling.params import SamplingParams
from kvflow.sampling.sampler import Sampler, SamplingBatch
from kvflow.step import BlockOp, RunnerOutput, ScheduledRequest, SchedulerOutput


@dataclass
class RunnerRequest:
    """The runner's state of one request."""
    prompt_token_ids: list[int]
    token_ids: list[int]                  # the tokens of every position given so far (outputs included)
    params: SamplingParams
    stop_ids: set[int]
    generator: torch.Generator | None     # seeded requests draw from their own stream
    block_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    num_prompt_logprobs: int = 1          # prompt tokens covered (the first one has none)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor      # rows of the hidden states that sample (k + 1 per request verifying k drafts)
    sampling_rows: list[int]          # index in the step's rows (SchedulerOutput.rows) of each request that samples
    # rows that want prompt logprobs: (scheduled index, first flat row, number of rows, first position)
    prompt_logprob_rows: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class Segment:
    """One request's tokens in a forward pass: token_ids at positions start.., their K/V written (and the
    context read) through the request's block table."""
    token_ids: list[int]
    start: int
    table: np.ndarray
    as_decodes: bool = False     # one decode row per token (each attends up to its own position); these come first
    num_logits: int = 0          # the rows of its last num_logits tokens are wanted for logits


def attach_kv_cache(model, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str,
                    kv_cache_dtype: str = "auto") -> tuple[list, list, list, list]:
    """A paged KV cache for `model`, bound to its attention layers: (k caches, v caches, k scales, v scales),
    one tensor per layer, indexed by block id on dim 0."""
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    cache_dtype = torch.int8 if kv_cache_dtype == "int8" else dtype
    # zero-initialised: padded reads of unused slots must be finite (they are masked out)
    k_caches = [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(cfg.num_layers)]
    v_caches = [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(cfg.num_layers)]
    # int8: one scale per (slot, kv head) for K and for V, in the compute dtype (attention/cpu.py)
    k_scales: list[torch.Tensor] = []
    v_scales: list[torch.Tensor] = []
    if kv_cache_dtype == "int8":
        k_scales = [torch.zeros(shape[:3], dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        v_scales = [torch.zeros(shape[:3], dtype=dtype, device=device) for _ in range(cfg.num_layers)]
    for i, (layer, k, v) in enumerate(zip(model.layers, k_caches, v_caches)):
        layer.self_attn.k_cache, layer.self_attn.v_cache = k, v
        if k_scales:
            layer.self_attn.k_scale, layer.self_attn.v_scale = k_scales[i], v_scales[i]
    return k_caches, v_caches, k_scales, v_scales


class ModelRunner:
    def __init__(self, model, cfg: ModelConfig, dtype: torch.dtype, device: str,
                 num_blocks: int, block_size: int, kv_cache_dtype: str = "auto"):
        self.model, self.cfg, self.device, self.block_size, self.dtype = model, cfg, device, block_size, dtype
        self.k_caches, self.v_caches, self.k_scales, self.v_scales = attach_kv_cache(
            model, cfg, num_blocks, block_size, dtype, device, kv_cache_dtype)
        expose_submodules(model)
        self.sampler = Sampler()
        self.requests: dict[str, RunnerRequest] = {}
        self.swap_tensors: list[torch.Tensor] = []
        self.kv_store = None              # DiskKVStore, when the disk tier is on
        self.collect_hidden = False       # return the last prompt token's hidden state (a length predictor's)
        self.proposer = None              # speculative decoding's draft method (kvflow/spec), when on
        self._copier = None               # a thread for block copies that overlap a step (async swap-in)
        self._pending: list = []

    def kv_tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds KV-cache state, each indexed by block id on dim 0 (copying block b
        of each of them copies the block's whole content)."""
        return self.k_caches + self.v_caches + self.k_scales + self.v_scales

    # ---- KV blocks and tiers --------------------------------------------------------------------------------

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
        apply_block_ops(self, [BlockOp("swap_out", ids, ids), BlockOp("swap_in", ids, ids)])
        return 2 * n * self.block_bytes / max(time.perf_counter() - t0, 1e-6)

    def block_spec(self) -> list[list]:
        """Shape and dtype of one block of each KV tensor (what a disk-tier file must hold)."""
        return [[list(t.shape[1:]), str(t.dtype).removeprefix("torch.")] for t in self.kv_tensors()]

    def background_copy(self, fn) -> None:
        """Run a block copy on the copy thread; the next `execute` waits for it before touching the cache."""
        if self._copier is None:
            from concurrent.futures import ThreadPoolExecutor
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="kvflow-copy")
        self._pending.append(self._copier.submit(fn))

    def wait_copies(self) -> None:
        for fut in self._pending:
            fut.result()
        self._pending.clear()

    def read_block(self, block_id: int) -> list[torch.Tensor]:
        return [t[block_id].to("cpu", copy=True) for t in self.kv_tensors()]

    # ---- one step ---------------------------------------------------------------------------------------------

    def _update_states(self, sched: SchedulerOutput, scheduled: list[ScheduledRequest]) -> None:
        for rid in sched.finished_req_ids:
            self.requests.pop(rid, None)
            if self.proposer is not None:
                self.proposer.forget(rid)
        for new in sched.new_requests:
            gen = None
            if new.params.seed is not None:      # its own stream, on the runner's device
                gen = torch.Generator(device=self.device).manual_seed(new.params.seed)
            self.requests[new.req_id] = RunnerRequest(new.prompt_token_ids, list(new.prompt_token_ids), new.params, set(new.stop_ids), gen)
        for s in scheduled:
            state = self.requests[s.req_id]
            if s.blocks_replaced:
                state.block_ids = np.asarray(s.block_ids, dtype=np.int64)
            elif s.block_ids:
                state.block_ids = np.concatenate([state.block_ids, np.asarray(s.block_ids, dtype=np.int64)])
            del state.token_ids[s.num_computed_tokens:]
            state.token_ids.extend(s.token_ids)

    def prepare(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        # one-token rows first; a request verifying k drafts (its last token and the drafts) is k + 1 of them,
        # each attending up to its own position: the step's K/V are written before attention reads the cache
        as_decodes = [s.num_new_tokens == 1 + s.num_spec_tokens for s in scheduled]
        order = sorted(range(len(scheduled)), key=lambda i: not as_decodes[i])
        segments, sampling = [], []
        for i in order:
            s = scheduled[i]
            # the last position samples, and the k before it when it verifies k drafts
            segments.append(Segment(s.token_ids, s.num_computed_tokens, self.requests[s.req_id].block_ids,
                                    as_decodes[i], 1 + s.num_spec_tokens if s.sample else 0))
            if s.sample:
                sampling.append(i)
        ids, positions, attn, logits_indices, flat_starts = self.build_inputs(segments)
        prompt_rows = []
        for i, flat_start in zip(order, flat_starts):
            s, state = scheduled[i], self.requests[scheduled[i].req_id]
            if state.params.prompt_logprobs is not None and state.num_prompt_logprobs < state.prompt_len:
                # positions whose next token is a prompt token not yet covered
                start, ctx_len = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
                lo, hi = max(start, state.num_prompt_logprobs - 1), min(ctx_len, state.prompt_len - 1)
                if hi > lo:
                    prompt_rows.append((i, flat_start + lo - start, hi - lo, lo))
        return StepInputs(ids, positions, attn, logits_indices, sampling, prompt_rows)

    def build_inputs(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                              torch.Tensor, list[int]]:
        """The flat batch of `segments` (decode segments first): (input ids, positions, attention metadata,
        the rows wanted for logits, each segment's first row). The target's step and a draft's share it."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_tables, decode_lens, prefills, logits_indices, flat_starts = [], [], [], [], []
        for seg in segments:
            start, n = seg.start, len(seg.token_ids)
            ctx_len, table = start + n, seg.table
            pos = np.arange(start, ctx_len, dtype=np.int64)
            flat_starts.append(len(ids))
            ids.extend(seg.token_ids)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if seg.as_decodes:
                assert not prefills, "decode segments come first"
                decode_tables += [table] * n
                decode_lens += range(start + 1, ctx_len + 1)
            elif start == 0:
                prefills.append(PrefillSeq(flat_starts[-1], n, ctx_len, None, None))
            else:                      # part of its context is cached: attend to it through the blocks
                mask = torch.arange(ctx_len).unsqueeze(0) <= torch.arange(start, ctx_len).unsqueeze(1)
                prefills.append(PrefillSeq(flat_starts[-1], n, ctx_len,
                                           torch.from_numpy(table[:-(-ctx_len // bs)]).to(dev), mask.to(dev)))
            if seg.num_logits:
                logits_indices.extend(range(len(ids) - seg.num_logits, len(ids)))
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
        return (torch.tensor(ids, device=dev), torch.from_numpy(np.concatenate(positions)).to(dev), attn,
                torch.tensor(logits_indices, dtype=torch.int64, device=dev), flat_starts)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step: apply the block ops, compute the scheduled tokens, sample where asked."""
        self.wait_copies()                # the previous step's background copies land before anything else
        scheduled = sched.rows()
        self._update_states(sched, scheduled)
        apply_block_ops(self, sched.block_ops)
        out = RunnerOutput(req_ids=[s.req_id for s in scheduled], sampled_token_ids=[[] for _ in scheduled])
        if not scheduled:
            return out
        inp = self.prepare(scheduled)
        hidden = self.model(inp.input_ids, inp.positions, inp.attn)
        for i, row, count, pos in inp.prompt_logprob_rows:
            state = self.requests[scheduled[i].req_id]
            targets = state.prompt_token_ids[pos + 1:pos + 1 + count]
            out.prompt_logprobs[scheduled[i].req_id] = self.prompt_logprobs(
                hidden[row:row + count], targets, state.params.prompt_logprobs)
            state.num_prompt_logprobs = pos + 1 + count
        if not inp.sampling_rows:
            return out
        sample_hidden = hidden[inp.logits_indices]
        if self.collect_hidden:
            self._collect_hidden(scheduled, inp, sample_hidden, out)
        logits = self.model.compute_logits(sample_hidden)   # the sampler works in fp32
        if any(scheduled[i].num_spec_tokens for i in inp.sampling_rows):
            self._sample_and_verify(scheduled, inp.sampling_rows, logits, out)
        else:
            self._sample(scheduled, inp.sampling_rows, logits, out)
        if self.proposer is not None:
            self._propose(scheduled, out)
        return out

    def _batch(self, rows: list[tuple[RunnerRequest, list[int], bytes | None]], logits) -> SamplingBatch:
        """A sampling batch, one row per (request state, its output tokens at that row, grammar mask)."""
        return SamplingBatch.build([r.params for r, _, _ in rows], [r.prompt_token_ids for r, _, _ in rows],
                                   [o for _, o, _ in rows], [r.generator for r, _, _ in rows],
                                   [r.stop_ids for r, _, _ in rows], logits.shape[-1], device=logits.device,
                                   bitmasks=[m for _, _, m in rows])

    def _sample(self, scheduled, sampling_rows: list[int], logits, out: RunnerOutput) -> None:
        states = [self.requests[scheduled[i].req_id] for i in sampling_rows]
        sb = self._batch([(r, r.token_ids[r.prompt_len:], scheduled[i].token_bitmask)
                          for r, i in zip(states, sampling_rows)], logits)
        sampled = self.sampler(logits, sb)
        if sampled.logprobs is not None:
            out.logprobs = [None] * len(scheduled)
        for j, i in enumerate(sampling_rows):
            out.sampled_token_ids[i] = [sampled.token_ids[j]]
            if sampled.logprobs is not None and states[j].params.logprobs is not None:
                out.logprobs[i] = [(sampled.logprobs[j], sampled.ranks[j])]

    def _sample_and_verify(self, scheduled, sampling_rows: list[int], logits, out: RunnerOutput) -> None:
        """A step with drafts to verify: every sampling request's rows go through the rejection sampler
        (kvflow/spec/rejection.py); a request without drafts is a group of one row, sampled as usual."""
        from kvflow.spec.rejection import verify
        rows, groups = [], []
        for i in sampling_rows:
            s = scheduled[i]
            r, k = self.requests[s.req_id], s.num_spec_tokens
            drafts = s.token_ids[len(s.token_ids) - k:] if k else []
            n_out = s.num_computed_tokens + s.num_new_tokens - k - r.prompt_len   # outputs before the drafts
            words = len(s.token_bitmask) // (k + 1) if s.token_bitmask is not None else 0
            groups.append((len(rows), drafts, r.generator))
            for j in range(k + 1):
                mask = s.token_bitmask[j * words:(j + 1) * words] if words else None
                rows.append((r, r.token_ids[r.prompt_len:r.prompt_len + n_out + j], mask))
        tokens, token_rows, sampled = verify(logits, self._batch(rows, logits), groups)
        if sampled.logprobs is not None:
            out.logprobs = [None] * len(scheduled)
        for g, i in enumerate(sampling_rows):
            out.sampled_token_ids[i] = tokens[g]
            if sampled.logprobs is not None and self.requests[scheduled[i].req_id].params.logprobs is not None:
                out.logprobs[i] = [(sampled.logprobs[r], sampled.ranks[r]) for r in token_rows[g]]

    def _propose(self, scheduled, out: RunnerOutput) -> None:
        """Drafts for the next step, for the requests the scheduler asked (after the tokens just emitted)."""
        from kvflow.spec.base import DraftRequest
        asks = []
        for i, s in enumerate(scheduled):
            if not s.num_draft_tokens or not out.sampled_token_ids[i]:
                continue
            r = self.requests[s.req_id]
            if out.sampled_token_ids[i][-1] in r.stop_ids:
                continue
            known = r.token_ids[:s.num_computed_tokens + s.num_new_tokens - s.num_spec_tokens]
            asks.append(DraftRequest(s.req_id, known + out.sampled_token_ids[i], s.num_draft_tokens))
        if asks:
            t0 = time.perf_counter()
            proposed = self.proposer.propose(asks)
            out.draft_seconds, out.draft_tokens = time.perf_counter() - t0, sum(a.num_tokens for a in asks)
            for a, drafts in zip(asks, proposed):
                if drafts:
                    out.draft_token_ids[a.req_id] = drafts

    def _collect_hidden(self, scheduled: list[ScheduledRequest], inp: StepInputs, hidden: torch.Tensor,
                        out: RunnerOutput) -> None:
        """The final hidden state of the last prompt token, for each request whose prompt ends this step."""
        row = -1
        for i in inp.sampling_rows:
            s = scheduled[i]
            row += 1 + s.num_spec_tokens         # its last position's row
            if s.num_computed_tokens + s.num_new_tokens == self.requests[s.req_id].prompt_len:
                out.prompt_hidden[s.req_id] = hidden[row].float().tolist()

    @torch.inference_mode()
    def embed_features(self, token_ids: list[int]) -> np.ndarray:
        """The mean of the prompt's input embeddings (float32): what a length predictor reads before the
        prefill."""
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        return self.model.embed_tokens(ids).float().mean(dim=0).cpu().numpy()

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
