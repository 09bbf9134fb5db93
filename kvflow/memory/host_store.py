"""A host-memory store of KV blocks keyed by the engine's chained block hashes, least recently used out: the
place KV outlives the engine core that computed it, shared by every worker that can reach the Ray actor
holding it.

  disaggregated serving (kvflow/disagg)   Mooncake's KV pool: prefill workers publish the prompt blocks they
                                          computed; a prefill worker reads the prefix it lacks from here
  serverless (kvflow/serverless)          DeepFlow's central store: a replica's prefix cache is kept here
                                          before it scales down, and read by the replicas that come later

Equal hash at position i means equal whole prefix up to block i (the hash of a block names its parent's),
so the store is a radix tree of blocks flattened: a lookup walks a prompt's chain until a block is missing,
and no token is compared. A block is one numpy array per KV tensor, in the layout kvflow/cluster/kv_transfer.py
exports (bf16 as int16 bits); the store copies what it keeps, holding no reference to a sender's buffers.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class HostKVStore:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the host KV store's size must be positive, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[int, list[np.ndarray]] = OrderedDict()   # hash -> one array per KV tensor
        self.dtypes: list[str] | None = None
        self.bytes = 0
        self.puts = self.lookups = self.hit_blocks = self.evictions = 0

    def put(self, hashes: list[int], dtypes: list[str], arrays: list[np.ndarray]) -> int:
        """Store blocks (arrays: one per KV tensor, blocks on dim 0, in `hashes` order); how many are new."""
        if not hashes:
            return 0
        if self.dtypes is not None and dtypes != self.dtypes:
            raise ValueError(f"KV blocks of dtypes {dtypes} do not match the stored ones {self.dtypes}")
        if any(a.shape[0] != len(hashes) for a in arrays):
            raise ValueError("every KV array must hold one row per block hash")
        self.dtypes = list(dtypes)
        new = 0
        for i, h in enumerate(hashes):
            if h in self.blocks:
                self.blocks.move_to_end(h)
                continue
            block = [np.ascontiguousarray(a[i]) for a in arrays]
            self.blocks[h] = block
            self.bytes += sum(b.nbytes for b in block)
            new += 1
        while self.bytes > self.max_bytes and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= sum(b.nbytes for b in old)
            self.evictions += 1
        self.puts += new
        return new

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of this chain are stored (the radix walk: stops at the first gap)."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def get(self, hashes: list[int], skip: int = 0) -> tuple[list[int], list[str], list[np.ndarray]]:
        """The longest stored prefix of `hashes`, less its first `skip` blocks (the caller holds them):
        (hashes, dtypes, arrays with blocks on dim 0)."""
        self.lookups += 1
        n = self.match(hashes)
        keys = hashes[skip:n]
        if not keys:
            return [], self.dtypes or [], []
        for h in keys:
            self.blocks.move_to_end(h)
        self.hit_blocks += len(keys)
        per_tensor = zip(*(self.blocks[h] for h in keys))
        return keys, list(self.dtypes), [np.stack(t) for t in per_tensor]

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"blocks": len(self.blocks), "bytes": self.bytes, "max_bytes": self.max_bytes, "puts": self.puts,
                "lookups": self.lookups, "hit_blocks": self.hit_blocks, "evictions": self.evictions}
