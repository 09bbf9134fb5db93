"""KV tiers: places outside the device cache where KV blocks are kept, behind one interface.

A tier's bookkeeping lives here, on the scheduler's side (no torch). Its data moves by `BlockOp`s that the
KV-cache manager emits and the model runner applies with the handler registered for the op's kind
(kvflow/engine/block_ops.py). Today's tiers:
  swap  (memory/swap_tier.py)   host blocks holding a preempted request's table; keys are swap block ids
  disk  (memory/disk_store.py)  prefix blocks in files, keyed by chained block hash; survives restarts
A remote tier (KV handed over by another worker) is a new file implementing the same interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from kvflow.step import BlockOp


class KVTier(ABC):
    name: str = ""
    save_kind: str = ""       # BlockOp kind: device blocks -> tier
    load_kind: str = ""       # BlockOp kind: tier -> device blocks

    def save_op(self, device_blocks: list[int], keys: list[int]) -> BlockOp:
        return BlockOp(self.save_kind, list(device_blocks), list(keys))

    def load_op(self, keys: list[int], device_blocks: list[int]) -> BlockOp:
        return BlockOp(self.load_kind, list(keys), list(device_blocks))

    @abstractmethod
    def contains(self, key: int) -> bool:
        """The tier holds (or is writing) this key: an in-memory check, never I/O."""

    def fetch(self, keys: list[int]) -> int | None:
        """Get keys ready to load without blocking: None while some are still on their way (the request
        waits in the loading-KV state), else how many leading keys can be loaded now."""
        return len(keys)

    def discard(self, keys: list[int]) -> None:
        """Forget data fetched for keys that will not be loaded after all."""
