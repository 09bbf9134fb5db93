"""A cold start, phase by phase: from "a replica is asked for" to its first token.

`start_core` builds an engine core as kvflow/engine/core_process.py `build_core` does, timing each phase:
  process     from when the worker was asked for (`asked_at`, wall clock) to its constructor: Ray starting a
              worker process and Python starting in it
  imports     torch and the engine's modules
  kernels     kvflow's CPU kernels built or loaded from their build cache (kvflow/kernels)
  weights     the checkpoint read (GGUF parsed and memory-mapped) and the model built from it, less `kv_alloc`
  kv_alloc    the KV cache's tensors allocated (measured by allocating tensors of the same shapes once more:
              EngineCore.build allocates them along with the model)
  warm_up     one small request through every stage (first-call costs: allocator growth, kernel selection)
The replica's side adds `attach` (a Serve replica claiming a worker, or starting one) and the request's own
`first_token`; `breakdown_rows` lays them out for the benchmark and docs.
"""
from __future__ import annotations

import time

PHASES = ("process", "imports", "kernels", "weights", "kv_alloc", "warm_up")


def start_core(config_json: str, num_threads: int | None, asked_at: float | None):
    """(EngineCore, {phase: seconds}) for this config, built and warmed up in this process."""
    entered = time.time()
    out: dict[str, float] = {"process": max(0.0, entered - asked_at) if asked_at else 0.0}
    t = time.perf_counter()
    import torch

    from kvflow.config import ResolvedConfig
    from kvflow.engine.core import EngineCore
    from kvflow.models.gguf import read_gguf
    from kvflow.models.loader import is_gguf
    if num_threads:
        torch.set_num_threads(num_threads)
    out["imports"] = time.perf_counter() - t

    t = time.perf_counter()
    import kvflow.kernels
    kvflow.kernels.load_ops()
    out["kernels"] = time.perf_counter() - t

    t = time.perf_counter()
    rc = ResolvedConfig.from_json(config_json)
    reader = read_gguf(rc.model_path) if is_gguf(rc.model_path) else None
    core = EngineCore.build(rc, reader)
    built = time.perf_counter() - t

    t = time.perf_counter()
    again = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in core.runner.kv_tensors()]
    out["kv_alloc"] = time.perf_counter() - t
    del again
    out["weights"] = max(0.0, built - out["kv_alloc"])

    t = time.perf_counter()
    core.warm_up()
    out["warm_up"] = time.perf_counter() - t
    return core, out


def breakdown_rows(start: dict) -> list[tuple[str, float]]:
    """(phase, seconds) rows of one replica start record (the registry's, pool.py), in order."""
    rows = []
    if start.get("kind") == "cold":
        rows += [(p, start["breakdown"].get(p, 0.0)) for p in PHASES]
    rows.append(("attach", start.get("attach_s", 0.0)))
    return rows
