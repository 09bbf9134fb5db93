"""The disk tier of the prefix cache in the simulator (`kv_store_dir`): kvflow/memory/disk_store.py's
DiskKVStore without the files, behind the same KVTier interface, so the real KVCacheManager and Scheduler
drive it unchanged.

  index     block hashes held, least recently used first, at most kv_store_max_bytes / block bytes; a
            block is in once the KV manager spills it (the real store counts a queued write as held)
  fetch     one reader, as the store's reader thread: the keys not yet read queue behind what it is reading,
            each taking block bytes / the profile's disk_bytes_per_s; None while any of them is still being
            read (the request waits in the loading-KV state), then how many leading keys are still held
  load_op   the runner takes the staged blocks (their copy into the cache is part of the step that loads
            them, as every block op: SimRunner)

Each simulated replica has its own tier (the real one is a directory that engines on one machine may share).
Nothing persists between simulations.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvflow.memory.tiers import KVTier
from kvflow.step import BlockOp


class SimDiskTier(KVTier):
    name, save_kind, load_kind = "disk", "spill", "load"

    def __init__(self, capacity_blocks: int, read_s_per_block: float, clock: Callable[[], float]):
        self.capacity, self.read_s, self.clock = capacity_blocks, read_s_per_block, clock
        self.index: OrderedDict[int, None] = OrderedDict()
        self.staged: dict[int, float] = {}     # key -> when its read ends
        self.reader_free = 0.0
        self.num_written = self.num_evicted = self.num_read = 0

    def save_op(self, device_blocks: list[int], keys: list[int]) -> BlockOp:
        for key in keys:
            self.index[key] = None
            self.index.move_to_end(key)
        self.num_written += len(keys)
        while len(self.index) > self.capacity:
            self.index.popitem(last=False)
            self.num_evicted += 1
        return super().save_op(device_blocks, keys)

    def contains(self, key: int) -> bool:
        return key in self.index

    def fetch(self, keys: list[int]) -> int | None:
        now = self.clock()
        todo = [k for k in keys if k not in self.staged]
        t = max(now, self.reader_free)
        for k in todo:
            t += self.read_s
            self.staged[k] = t
        self.reader_free = t
        self.num_read += len(todo)
        if any(self.staged[k] > now for k in keys):
            return None
        for i, k in enumerate(keys):
            if k not in self.index:          # gone since: the real read finds no file, and the chain stops
                return i
            self.index.move_to_end(k)
        return len(keys)

    def discard(self, keys: list[int]) -> None:
        for k in keys:
            self.staged.pop(k, None)

    def load_op(self, keys: list[int], device_blocks: list[int]) -> BlockOp:
        self.discard(keys)                   # the runner takes them (DiskKVStore.take)
        return super().load_op(keys, device_blocks)

    def wake_at(self) -> float | None:
        """When the next read in flight ends (a replica with nothing else to do steps again then)."""
        now = self.clock()
        pending = [t for t in self.staged.values() if t > now]
        return min(pending) if pending else None
