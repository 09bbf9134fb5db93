"""What attention needs to know about one step's flat batch, built once per step by the model runner."""
from dataclasses import dataclass

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
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillSeq]
