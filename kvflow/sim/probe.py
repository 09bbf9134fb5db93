"""How fast this machine is right now, measured with no kvflow code: the fidelity check's control.

A fidelity check (fidelity.py) judges real runs against a calibration made minutes before them. On a shared
machine the speed of the cores and of memory moves on its own, and a simulation cannot be judged more
finely than the machine holds still. The probe times two fixed kernels, each the median of a few repeats:

  memory_ms   one matrix-vector product over a float32 matrix larger than the caches (memory bound, as a
              decode step of a small model on a CPU is: it streams the weights)
  python_ms   a pure-Python loop (interpreter bound, as the scheduler's and the runner's bookkeeping is)

Taken before the calibration and after each real run, the probes' spread (the largest over the smallest,
minus 1) says how far the machine itself moved during the check. Imports torch.
"""
from __future__ import annotations

import statistics
import time

MATRIX_MB = 96           # larger than the last-level cache of the CPUs here (32 MB on a Zen 3)
PYTHON_LOOP = 200_000
REPEATS = 15


def probe(matrix_mb: int = MATRIX_MB, repeats: int = REPEATS) -> dict[str, float]:
    """{"memory_ms": ..., "python_ms": ...}: the median time of each kernel over `repeats` runs, on one thread
    (torch's thread count is restored afterwards)."""
    import torch
    if matrix_mb < 1 or repeats < 1:
        raise ValueError(f"matrix_mb and repeats must be at least 1, got {matrix_mb!r} and {repeats!r}")
    cols = 576
    weight = torch.full((matrix_mb * (1 << 20) // (4 * cols), cols), 0.5, dtype=torch.float32)
    x = torch.full((1, cols), 0.25, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.matmul(x, weight.T)                  # the first call selects the kernel
        memory = [_timed(lambda: torch.matmul(x, weight.T)) for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    python = [_timed(_loop) for _ in range(repeats)]
    return {"memory_ms": round(statistics.median(memory) * 1e3, 3),
            "python_ms": round(statistics.median(python) * 1e3, 3)}


def spread(probes: list[dict[str, float]]) -> dict[str, float]:
    """Per kernel: how far its slowest probe was from its fastest (max / min - 1; 0.0 for fewer than two)."""
    keys = probes[0] if probes else {}
    return {k: round(max(p[k] for p in probes) / min(p[k] for p in probes) - 1.0, 4) for k in keys}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _loop() -> int:
    s = 0
    for i in range(PYTHON_LOOP):
        s += i
    return s
