"""What attention needs to know about one step's flat batch, built once per step by the model runner."""
from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSeq:
    """A request with more than one new token this step (a prompt chunk, or a recompute after preemption)."""
    start: int                       # first of its tokens in the flat batch
    num_tokens: int                  # new tokens this step
    context_len: int                 # tokens it attends to: cached ones + the new ones
    block_table: torch.Tensor | None  # its blocks [nb]; None when nothing is cached (attend to new K/V only)
    mask: torch.Tensor | None        # [num_tokens, context_len] bool causal mask past the cached prefix


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor       # [T] cache slot (block * block_size + offset) of each new token
    num_decodes: int                 # the first num_decodes tokens are single-token rows (decode steps)
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks], padded with block 0
    decode_context_lens: torch.Tensor | None  # int64 [num_decodes]: tokens each decode row attends to
    prefills: list[PrefillSeq]

    _decode_mask: torch.Tensor | None = field(default=None, repr=False)

    def decode_mask(self, span: int) -> torch.Tensor:
        """[num_decodes, 1, 1, span] bool, True = attend, for SDPA over the padded block tables (span =
        max_blocks * block_size). Built on first use, once per step; the CPU kernel reads the lengths."""
        if self._decode_mask is None:
            lens = self.decode_context_lens
            self._decode_mask = (torch.arange(span, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)).view(
                len(lens), 1, 1, span)
        return self._decode_mask
