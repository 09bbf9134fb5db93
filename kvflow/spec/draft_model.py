"""Draft-model proposer: a smaller (or cheaper) model with the target's vocabulary drafts k tokens greedily.

    speculative_config={"method": "draft_model", "model": PATH, "num_speculative_tokens": k,
                        "quantization": None | "int8" | "int4" | "gguf"}

It runs in the same engine, loaded by the same loader (a Hugging Face folder or a GGUF file), with its own
paged KV cache: one tensor per draft layer shaped like the target's (same number of blocks, same block size)
and indexed by the target's own block tables and slot mapping, so no second allocator. The scheduler gives
a request it asks to draft k lookahead slots past the step's tokens (KVCacheManager.allocate_slots); the
draft writes its drafts' KV there, and the verification step then overwrites those positions in the
target's cache.

What the draft cache holds is tracked by content, not by request: for every block id, the chained hash of
the tokens before the block and the tokens whose draft K/V it holds from its start. A request's valid draft
prefix is then the walk over its block table while that matches its tokens. This one rule covers rollback
of rejected drafts (their tokens no longer match), preemption by recompute or swap and copy-on-write (the
blocks' ids or contents changed: the draft recomputes from there), and prefix caching (a hit block whose
draft K/V some request computed is reused). It can only ever cost acceptance, never change an output: the
target verifies every draft.

After each step, for the requests asked to draft: one batched forward catches each up on the tokens its
draft cache lacks (one-token rows for the usual case, the token just emitted; prompt chunks as prefill rows
beside them, at most the step's token budget: a longer prompt is caught up over several steps and drafts
after; the few tokens after a verification are decode rows, each attending up to its own position), its
last row's argmax is the first draft; then k - 1 more batched one-token forwards.
"""
from __future__ import annotations

import torch

from kvflow.engine.model_runner import Segment, attach_kv_cache
from kvflow.memory.kv_cache_manager import extend_block_hashes, hash_block
from kvflow.models.llama import expose_submodules
from kvflow.spec.base import DraftRequest, Proposer
from kvflow.spec.config import PROPOSERS


def load_draft(config, runner):
    """The draft model (ValueError naming speculative_config.model when its vocabulary is not the target's)."""
    from kvflow.models.loader import is_gguf, load_model, load_model_config
    reader = None
    if is_gguf(config.model):
        from kvflow.models.gguf import read_gguf
        reader = read_gguf(config.model)
    cfg = load_model_config(config.model, reader)
    if cfg.vocab_size != runner.cfg.vocab_size:
        raise ValueError(f"speculative_config.model {config.model!r} has a vocabulary of {cfg.vocab_size} tokens, "
                         f"the target's has {runner.cfg.vocab_size}: a draft model must share the target's tokenizer")
    model = load_model(config.model, cfg, runner.dtype, runner.device, runner.model.rotary.max_position, reader,
                       config.quantization)
    expose_submodules(model)
    return model, cfg


@PROPOSERS.register("draft_model")
class DraftModelProposer(Proposer):
    def __init__(self, config, runner):
        super().__init__(config, runner)
        self.model, self.draft_cfg = load_draft(config, runner)
        self.kv = attach_kv_cache(self.model, self.draft_cfg, runner.k_caches[0].shape[0], runner.block_size,
                                  runner.dtype, runner.device)
        self.contents: dict[int, tuple[int, tuple[int, ...]]] = {}   # block id -> (parent key, tokens held)
        self.chains: dict[str, list[int]] = {}                         # request -> its full blocks' chained hashes

    def forget(self, req_id: str) -> None:
        self.chains.pop(req_id, None)

    # ---- what the draft cache holds ------------------------------------------------------------------------

    def _parent(self, chain: list[int], seq: list[int], j: int) -> int:
        """The key of block j's prefix: the chained hash of seq's blocks before it (0 for the first)."""
        if j == 0:
            return 0
        if j - 1 < len(chain):
            return chain[j - 1]
        bs = self.runner.block_size
        return hash_block(self._parent(chain, seq, j - 1), seq[(j - 1) * bs:j * bs])

    def _chain(self, req_id: str, tokens: list[int]) -> list[int]:
        return extend_block_hashes(self.chains.setdefault(req_id, []), tokens, self.runner.block_size)

    def _valid(self, chain: list[int], tokens: list[int], table) -> int:
        """How many leading positions of `tokens` the draft cache holds through `table`."""
        bs, valid = self.runner.block_size, 0
        for j in range(min(-(-len(tokens) // bs), len(table))):
            entry = self.contents.get(int(table[j]))
            if entry is None or entry[0] != self._parent(chain, tokens, j):
                break
            want, held = tokens[j * bs:(j + 1) * bs], entry[1]     # the common prefix of the two
            m = next((i for i, (a, b) in enumerate(zip(held, want)) if a != b), min(len(held), len(want)))
            valid += m
            if m < bs:
                break
        return valid

    def _record(self, chain: list[int], seq: list[int], start: int, end: int, table) -> None:
        """The draft wrote K/V for seq[start:end] at those positions (seq[:start] was held already)."""
        bs = self.runner.block_size
        for j in range(start // bs, -(-end // bs)):
            self.contents[int(table[j])] = (self._parent(chain, seq, j), tuple(seq[j * bs:min((j + 1) * bs, end)]))

    # ---- drafting -------------------------------------------------------------------------------------------

    def _forward(self, segments: list[Segment]) -> list[int]:
        """One draft forward over `segments`; the argmax after each segment that wants logits."""
        ids, positions, attn, logits_indices, _ = self.runner.build_inputs(segments)
        hidden = self.model(ids, positions, attn)
        if not len(logits_indices):
            return []
        return self.model.compute_logits(hidden[logits_indices]).argmax(dim=-1).tolist()

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        budget = self.token_budget
        drafts: list[list[int]] = [[] for _ in requests]
        decodes, prefills = [], []          # (request index, segment, sequence, chain, table, draft length)
        for i, r in enumerate(requests):
            tokens, table = r.token_ids, self.runner.requests[r.req_id].block_ids
            L, k = len(tokens), self.room(r, table)
            if k <= 0 or budget <= 0:
                continue
            chain = self._chain(r.req_id, tokens)
            valid = min(self._valid(chain, tokens, table), L - 1)     # the last token is always run: its logits
            n = min(L - valid, budget)
            budget -= n
            seq = list(tokens)
            done = valid + n == L
            rows = n <= self.config.num_speculative_tokens + 1    # a few tokens (after a verification): decode rows
            seg = Segment(seq[valid:valid + n], valid, table, as_decodes=rows, num_logits=1 if done else 0)
            (decodes if rows else prefills).append((i, seg, seq, chain, table, k if done else 0))
        work = decodes + prefills
        if not work:
            return drafts
        firsts = iter(self._forward([w[1] for w in work]))
        live = []
        for i, seg, seq, chain, table, k in work:
            self._record(chain, seq, seg.start, seg.start + len(seg.token_ids), table)
            if k:
                seq.append(next(firsts))
                drafts[i].append(seq[-1])
                live.append((i, seq, chain, table, k))
        for j in range(1, max((w[4] for w in live), default=0)):
            live = [w for w in live if w[4] > j]
            segs = [Segment([seq[-1]], len(seq) - 1, table, as_decodes=True, num_logits=1)
                    for _, seq, _, table, _ in live]
            for (i, seq, chain, table, _), tok in zip(live, self._forward(segs)):
                self._record(chain, seq, len(seq) - 1, len(seq), table)
                seq.append(tok)
                drafts[i].append(tok)
        return drafts
