"""Layer-skip proposer: self-speculation with the target's own first `num_layers` layers, its final norm and
its head (early exit). No second model and no cache of its own.

    speculative_config={"method": "layer_skip", "num_speculative_tokens": k, "num_layers": n}

The K/V of the first n layers are the target's own (the same computation on the same tokens), so after a
step the draft already holds everything before the token just emitted: it runs that token and then its
drafts, k batched one-token forwards through n layers, reading the target's cache and writing the drafted
positions' K/V into the lookahead slots the scheduler allocated (KVCacheManager.allocate_slots); the
verification step overwrites them with the full model's. How much it pays depends on how often the early
exit agrees with the full model; the adaptive controller (spec/adaptive.py) turns drafting down for
requests where it rarely does.
"""
from __future__ import annotations

import torch

from kvflow.engine.model_runner import Segment
from kvflow.spec.base import DraftRequest, Proposer
from kvflow.spec.config import PROPOSERS


@PROPOSERS.register("layer_skip")
class LayerSkipProposer(Proposer):
    def __init__(self, config, runner):
        super().__init__(config, runner)
        total = runner.cfg.num_layers
        n = config.num_layers if config.num_layers is not None else max(1, total // 4)
        if n > total:
            raise ValueError(f"speculative_config.num_layers ({n}) must be at most the model's {total} layers")
        self.num_layers = n
        self.layers = list(runner.model.layers)[:n]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """The target's forward pass cut after its first num_layers layers, then its final norm."""
        model = self.runner.model
        x, residual = model.embed_tokens(input_ids), None
        rope = model.rotary.cos_sin(positions)
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        x, _ = model.norm(x, residual)
        return x

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        runner = self.runner
        drafts: list[list[int]] = [[] for _ in requests]
        live = []                                 # (request index, tokens, block table, draft length)
        for i, r in enumerate(requests):
            table = runner.requests[r.req_id].block_ids
            k = self.room(r, table)
            if k > 0:
                live.append((i, list(r.token_ids), table, k))
        for j in range(max((w[3] for w in live), default=0)):
            live = [w for w in live if w[3] > j]
            segs = [Segment([seq[-1]], len(seq) - 1, table, as_decodes=True, num_logits=1)
                    for _, seq, table, _ in live]
            ids, positions, attn, logits_indices, _ = runner.build_inputs(segs)
            hidden = self.forward(ids, positions, attn)
            tokens = runner.model.compute_logits(hidden[logits_indices]).argmax(dim=-1).tolist()
            for (i, seq, _, _), tok in zip(live, tokens):
                seq.append(tok)
                drafts[i].append(tok)
        return drafts
