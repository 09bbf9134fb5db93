"""Building kvflow's CPU kernels (cpu.cpp) with the system C++ compiler, and loading them from a cache.

The shared library is compiled against the installed torch's headers for this machine's CPU
(-march=native), once: about 10 s. It is cached in `$KVFLOW_CACHE_DIR/kernels` (default
~/.cache/kvflow/kernels, or the temp dir when that is not writable) under a name that hashes the source,
the flags, torch's version and the CPU's feature flags, so an edit, a torch upgrade or another machine
sharing the folder builds its own copy. Which call sites use the kernels is decided in kvflow/kernels
(`kernel_ops`), not here.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import types
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.cpp")
# no -ffast-math: NaN checks and the order of fp32 roundings stay as written (no FMA contraction either);
# -fno-trapping-math lets loops with conversions and selects vectorise (results unchanged)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-w",
         "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch.compiled_with_cxx11_abi()))]


def _cpu_identity() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {flags}"


def cache_dir() -> Path:
    """$KVFLOW_CACHE_DIR/kernels or ~/.cache/kvflow/kernels; a folder in the temp dir if that is not
    writable (a read-only home)."""
    root = os.environ.get("KVFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvflow")
    path = Path(root) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"kvflow-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"


def library_path() -> Path:
    key = hashlib.blake2b(digest_size=8)
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), torch.__version__.encode(), _cpu_identity().encode()):
        key.update(part)
    return cache_dir() / f"kvflow_cpu_{key.hexdigest()}.so"


def build(path: Path) -> None:
    """Compile cpu.cpp into `path` (atomically: a concurrent build never sees a half-written file)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    torch_dir = Path(torch.__file__).parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
                sysconfig.get_paths()["include"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    # link torch's own libgomp (the same soname is already loaded): one OpenMP runtime in the process
    cmd = [cxx, *FLAGS, *(f"-I{p}" for p in includes), str(SOURCE), "-o", tmp, f"-L{torch_dir / 'lib'}",
           f"-Wl,-rpath,{torch_dir / 'lib'}", "-ltorch", "-ltorch_cpu", "-lc10"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CPU kernels failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library() -> types.SimpleNamespace | None:
    """Build (once) and load the library; its ops as attributes of a namespace, or None when it cannot be
    built here (no compiler, no headers, a read-only home). Ops that need CPU features this machine lacks
    are absent (int4_linear and int8_linear need AVX-512 VNNI)."""
    try:
        path = library_path()
        if not path.exists():
            logger.info("building kvflow's CPU kernels into %s (once)", path)
            build(path)
        torch.ops.load_library(str(path))
    except Exception as e:            # the callers run their PyTorch code
        logger.warning("kvflow's CPU kernels are unavailable, using the PyTorch path: %s", e)
        return None
    # each op's one overload, called directly: the OpOverloadPacket's Python __call__ adds ~0.2 us a call
    names = [op.name.removeprefix("kvflow::") for op in torch._C._jit_get_all_schemas()
             if op.name.startswith("kvflow::")]
    return types.SimpleNamespace(**{name: getattr(torch.ops.kvflow, name).default for name in names})
