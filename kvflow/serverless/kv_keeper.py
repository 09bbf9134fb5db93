"""KV kept across scale-downs (DeepFlow): one central prefix store in host memory that outlives replicas.

Before a serverless replica goes (scaled down, drained), its prefix cache is read out as host arrays and put
here under the engine's own prefix keys, the chained block hashes (kvflow/memory/kv_cache_manager.py
`extend_block_hashes`). Equal hashes mean equal whole prefixes, so the store is a radix tree of blocks: a
block's key names its parent's, and a lookup walks a prompt's chain from the root until a block is missing.
A replica that comes up later, or another replica, fetches the longest stored prefix of a new prompt and
adopts it into its own prefix cache (kvflow/cluster/kv_transfer.py `import_blocks`) before the request runs:
a conversation that returns after the service scaled to zero and back hits its prefix.

The store is kvflow/memory/host_store.py's `HostKVStore` as a Ray actor (named, one per serverless
application). The function here runs on an engine core's thread.
"""
from __future__ import annotations

import numpy as np


def export_prefix_cache(core, max_blocks: int) -> tuple[list[int], list[str], list[np.ndarray]]:
    """The core's cached prefix blocks, at most `max_blocks` of them, the most recently used first: (hashes,
    dtypes, arrays with blocks on dim 0), read into host memory. (Order does not matter to the keeper: every
    block is stored under its own chained hash.)"""
    from kvflow.cluster.kv_transfer import read_blocks
    pool = core.kv.pool
    # free_queue's tail holds the most recently used unreferenced blocks; referenced ones are in use, hot too
    order = [pool.blocks[i] for i in reversed(pool.free_queue)] + [b for b in pool.blocks if b.ref_count]
    cached = [b for b in order if b.block_hash is not None and pool.cached.get(b.block_hash) is b][:max_blocks]
    tensors = core.runner.kv_tensors()
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
    if not cached:
        return [], dtypes, []
    return [b.block_hash for b in cached], dtypes, read_blocks(tensors, [b.block_id for b in cached])
