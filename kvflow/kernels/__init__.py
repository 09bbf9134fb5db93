"""kvflow's CPU kernels (cpu.cpp and weights.cpp, compiled by build.py on first use for this CPU's
instruction set), and the one place that decides whether a call site runs them.

Every call site asks `kernel_ops(x)` for the kernels' ops (torch.ops.kvflow.*, as attributes of a
namespace) and runs its PyTorch code when the answer is None; that code is also the reference the
kernels are tested against. The answer is None when:
- `KVFLOW_CPU_KERNELS=0` (read once, at the first question: the library is then never built),
- the library cannot be built here (no compiler, no headers),
- the process-wide switch is off (`set_enabled(False)`, `with disabled():`; tests compare both paths),
- x is not a CPU tensor in a dtype the kernels compute in (KERNEL_DTYPES).
`kernel_ops_for(device, op)` answers for a device, when a layer is built: e.g. whether this machine has
the weight matmuls (int4_linear, int8_linear: CPUs with AVX-512 VNNI, or AVX2 + FMA; `weight_tiles()`
says which variant was built).

kernel_ops is asked on every layer call (~300 times a decode step), so it is two global reads and two
attribute tests: the library is loaded once into a module global, and the switch is a module global.
"""
from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float32)    # what every kernel computes in

ENABLED = True        # the process-wide switch (set_enabled, disabled); tests may also monkeypatch it

_UNLOADED = object()
_library: types.SimpleNamespace | None | object = _UNLOADED   # the loaded ops, or None: off or not buildable
_lock = threading.Lock()


def load_ops() -> types.SimpleNamespace | None:
    """The kernels as built, whatever the switch says (the kernels' own tests call them directly): built
    or loaded at the first call; None with KVFLOW_CPU_KERNELS=0 or when they cannot be built here."""
    global _library
    with _lock:
        if _library is _UNLOADED:
            if os.environ.get("KVFLOW_CPU_KERNELS", "1") == "0" or sys.platform == "win32":
                _library = None
            else:
                from kvflow.kernels.build import load_library
                _library = load_library()
    return _library


def kernel_ops(x: torch.Tensor) -> types.SimpleNamespace | None:
    """The kernels for tensor x, or None: run the PyTorch code (see the module's docstring)."""
    if not ENABLED:
        return None
    ops = _library if _library is not _UNLOADED else load_ops()
    if ops is None or not x.is_cpu or x.dtype not in KERNEL_DTYPES:
        return None
    return ops


def kernel_ops_for(device: torch.device | str, op: str | None = None) -> types.SimpleNamespace | None:
    """The kernels for tensors on `device`, or None; with `op`, None also when this build lacks that op
    (the weight matmuls need AVX-512 VNNI or AVX2 + FMA). For choices made once, e.g. a quantized
    layer's layout."""
    if not ENABLED or torch.device(device).type != "cpu":
        return None
    ops = load_ops()
    return ops if ops is not None and (op is None or hasattr(ops, op)) else None


def weight_tiles() -> str | None:
    """The weight kernels' variant in this build: "avx512_vnni", "avx2" or "none"; None with no kernels."""
    ops = load_ops()
    return None if ops is None else ops.weight_tiles()


def set_enabled(flag: bool) -> bool:
    """Turn the kernels on or off for the whole process (a layer built while they are off keeps the
    layout it chose). Returns the previous setting."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(flag)
    return previous


def enabled() -> bool:
    """Whether call sites run the kernels now (switch on, library built)."""
    return ENABLED and load_ops() is not None


@contextmanager
def disabled() -> Iterator[None]:
    """`with kernels.disabled():` runs the PyTorch code everywhere inside the block."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)
