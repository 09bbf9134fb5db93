"""KV kept across scale-downs (DeepFlow): one central prefix store in host memory that outlives replicas.

Before a serverless replica goes (scaled down, drained), its prefix cache is read out as host arrays and put
here under the engine's own prefix keys, the chained block hashes (kvflow/memory/kv_cache_manager.py
`extend_block_hashes`). Equal hashes mean equal whole prefixes, so the store is a radix tree of blocks: a
block's key names its parent's, and a lookup walks a prompt's chain from the root until a block is missing.
A replica that comes up later, or another replica, fetches the longest stored prefix of a new prompt and
adopts it into its own prefix cache (kvflow/cluster/kv_transfer.py `import_blocks`) before the request runs:
a conversation that returns after the service scaled to zero and back hits its prefix.

`KVKeeper` is a Ray actor (named, one per serverless application); its blocks are numpy arrays (one per KV
tensor, bf16 as int16 bits, exactly what kv_transfer exports), evicted least recently used past `max_bytes`.
The functions below it run on an engine core's thread.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class KVKeeper:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the KV keeper's size must be positive, got {max_bytes} bytes")
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


# ---- on an engine core's thread ------------------------------------------------------------------------------

def export_prefix_cache(core, max_blocks: int) -> tuple[list[int], list[str], list[np.ndarray]]:
    """The core's cached prefix blocks, at most `max_blocks` of them, the most recently used first: (hashes,
    dtypes, arrays with blocks on dim 0), read into host memory. (Order does not matter to the keeper: every
    block is stored under its own chained hash.)"""
    import torch

    from kvflow.cluster.kv_transfer import _to_numpy
    pool = core.kv.pool
    # free_queue's tail holds the most recently used unreferenced blocks; referenced ones are in use, hot too
    order = [pool.blocks[i] for i in reversed(pool.free_queue)] + [b for b in pool.blocks if b.ref_count]
    cached = [b for b in order if b.block_hash is not None and pool.cached.get(b.block_hash) is b][:max_blocks]
    tensors = core.runner.kv_tensors()
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
    if not cached:
        return [], dtypes, []
    ids = torch.tensor([b.block_id for b in cached], dtype=torch.long, device=tensors[0].device)
    return [b.block_hash for b in cached], dtypes, [_to_numpy(t.index_select(0, ids)) for t in tensors]


def cached_prefix(core, hashes: list[int]) -> int:
    """How many leading blocks of this chain the core's prefix cache holds."""
    n = 0
    for h in hashes:
        if core.kv.pool.lookup(h) is None:
            break
        n += 1
    return n
