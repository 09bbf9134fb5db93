"""A running request leaves one engine core with its KV blocks and continues in another (Llumnix-style
migration). Both halves run on the engine core's own thread, between two steps.

  export_request   the request's fully computed blocks, read into host arrays (one per KV tensor, blocks
                   on dim 0; bf16 travels as int16 bits, since numpy has no bf16), its output tokens, and
                   the request ended here
  import_blocks    those arrays written into free blocks of the destination, registered in its prefix cache
                   under the same chained hashes: the resumed request (its prompt and outputs) then finds
                   them as a prefix hit and computes only the tokens after the last full block

The arrays are plain numpy, so Ray moves them through its object store without a pickle of tensors; a
transfer that cannot fit (the destination's cache is full) imports fewer blocks, and the rest is computed.
"""
from __future__ import annotations

import numpy as np
import torch

from kvflow.request import RequestStatus

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.to("cpu")
    return (t.view(_BITS[t.dtype]) if t.dtype in _BITS else t).numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    # arrays from Ray's object store are read-only views: copied once here (torch wants writable memory)
    return torch.from_numpy(np.require(a, requirements=("C", "W"))).view(getattr(torch, dtype))


def read_blocks(tensors: list[torch.Tensor], block_ids) -> list[np.ndarray]:
    """Blocks `block_ids` (a list, or a long tensor on the cache's device) of each KV tensor, as host arrays."""
    if not isinstance(block_ids, torch.Tensor):
        block_ids = torch.tensor(list(block_ids), dtype=torch.long, device=tensors[0].device)
    return [_to_numpy(t.index_select(0, block_ids)) for t in tensors]


def export_request(core, request_id: str) -> tuple[dict | None, list[np.ndarray]]:
    """(meta, arrays) of a running or waiting request, which then ends here without an output; (None, [])
    when the core does not hold it (finished, aborted, or still compiling its grammar)."""
    req = core.scheduler.requests.get(request_id)
    if req is None or req.status.finished:
        return None, []
    kv = core.kv
    table = kv.table(request_id)
    n = min(min(req.num_computed_tokens, req.num_tokens) // kv.block_size, len(table))
    hashes = kv.block_hashes(req)[:n] if n else []
    tensors = core.runner.kv_tensors()
    arrays = read_blocks(tensors, [b.block_id for b in table[:n]]) if n else []
    meta = {"request_id": request_id, "output_token_ids": list(req.output_token_ids), "hashes": list(hashes),
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
            "num_preemptions": req.num_preemptions}
    core.abort_requests([request_id], RequestStatus.FINISHED_ABORTED)
    return meta, arrays


def import_blocks(core, hashes: list[int], arrays: list[np.ndarray], dtypes: list[str]) -> int:
    """Write exported blocks into this core's cache as prefix-cache entries; how many were written. It keeps
    half of the free blocks for the requests already here."""
    if not hashes or not arrays:
        return 0
    tensors = core.runner.kv_tensors()
    if len(arrays) != len(tensors) or any(a.shape[1:] != tuple(t.shape[1:]) for a, t in zip(arrays, tensors)):
        raise ValueError("the exported KV blocks do not match this replica's cache layout")
    placed = core.kv.adopt_blocks(hashes, core.kv.pool.num_free // 2)
    if not placed:
        return 0
    src = torch.tensor([i for i, _ in placed], dtype=torch.long)
    dst = torch.tensor([b for _, b in placed], dtype=torch.long, device=tensors[0].device)
    for t, a, dtype in zip(tensors, arrays, dtypes):
        t.index_copy_(0, dst, _from_numpy(a, dtype).index_select(0, src).to(t.device))
    return len(placed)


def cached_prefix(core, hashes: list[int]) -> int:
    """How many leading blocks of this chain the core's prefix cache holds."""
    return core.kv.cached_prefix(hashes)
