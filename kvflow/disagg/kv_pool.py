"""The shared KV pool (Mooncake's KV store): prefix blocks that any worker can read, keyed by the engine's
chained block hashes, in host memory of a Ray actor, least recently used first out.

A prefill worker publishes the prompt blocks it computed (after its prefill, before the handoff); another
prefill worker that receives a prompt with the same prefix reads the blocks it does not cache itself and
computes only the rest (worker.py). Equal hash at position i means equal prefix up to block i, so a reader
asks for a run of hashes and gets the leading ones the pool holds, with no token compared.

A block is one numpy array per KV tensor (the layout of kvflow/cluster/kv_transfer.py); the pool copies
what it keeps, so it holds no reference to a sender's buffers.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class KVPool:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.blocks: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self.dtypes: list[str] = []
        self.bytes = 0
        self.hits = self.misses = self.puts = self.evictions = 0

    def put(self, hashes: list[int], arrays: list[np.ndarray], dtypes: list[str]) -> int:
        """Keep blocks (arrays: one per KV tensor, blocks on dim 0); how many were new."""
        self.dtypes = list(dtypes)
        new = 0
        for i, h in enumerate(hashes):
            if h in self.blocks:
                self.blocks.move_to_end(h)
                continue
            block = [np.array(a[i]) for a in arrays]
            size = sum(b.nbytes for b in block)
            if size > self.capacity:
                break
            self.blocks[h] = block
            self.bytes += size
            new += 1
            while self.bytes > self.capacity:
                _, old = self.blocks.popitem(last=False)
                self.bytes -= sum(b.nbytes for b in old)
                self.evictions += 1
        self.puts += new
        return new

    def get(self, hashes: list[int]) -> tuple[list[np.ndarray], list[str]]:
        """The leading run of `hashes` held here, as arrays (one per KV tensor, blocks on dim 0), and their
        dtypes; ([], dtypes) when the first is not held."""
        found = []
        for h in hashes:
            block = self.blocks.get(h)
            if block is None:
                break
            self.blocks.move_to_end(h)
            found.append(block)
        self.hits += len(found)
        self.misses += len(hashes) - len(found)
        if not found:
            return [], self.dtypes
        return [np.stack([b[k] for b in found]) for k in range(len(found[0]))], self.dtypes

    def stats(self) -> dict:
        return {"blocks": len(self.blocks), "bytes": self.bytes, "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "puts": self.puts, "evictions": self.evictions}
