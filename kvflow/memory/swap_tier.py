"""The swap tier: host blocks that hold a preempted request's KV while it waits (keys: swap block ids).

The bookkeeping is a second `BlockPool`; the runner holds the host tensors (engine/block_ops.py).
"""
from __future__ import annotations

from kvflow.memory.block_pool import Block, BlockPool
from kvflow.memory.tiers import KVTier


class SwapTier(KVTier):
    name, save_kind, load_kind = "swap", "swap_out", "swap_in"

    def __init__(self, num_blocks: int):
        self.pool = BlockPool(num_blocks)

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def allocate(self, n: int) -> list[Block]:
        return self.pool.allocate(n)

    def release(self, blocks: list[Block]) -> None:
        self.pool.release(blocks[::-1])

    def contains(self, key: int) -> bool:
        return self.pool.blocks[key].ref_count > 0
