"""Building kvflow's CPU kernels (cpu.cpp, weights.cpp, register.cpp and their headers) with the system C++ compiler, and
loading them from a cache.

The shared library is compiled against the installed torch's headers for this machine's CPU
(-march=native), once: 10-25 s (the three files compile in parallel). The weight kernels' variant follows the instruction set
(kvflow.platform: AVX-512 VNNI, else AVX2 + FMA, else none); `KVFLOW_CPU_ISA=avx2` builds for AVX2 on an
AVX-512 machine (-mno-avx512f: the whole library as on an AVX2-only CPU), `generic` without AVX2 either.
It is cached in `$KVFLOW_CACHE_DIR/kernels` (default ~/.cache/kvflow/kernels, or the temp dir when that
is not writable) under a name that carries the instruction set and hashes the sources, the flags, torch's
version and the CPU's feature flags, so an edit, a torch upgrade or another machine sharing the folder
builds its own copy. Which call sites use the kernels is decided in kvflow/kernels (`kernel_ops`), not here.
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
import time
import types
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "cpu.cpp", HERE / "weights.cpp", HERE / "register.cpp"]   # compiled into one library
HEADERS = [HERE / "common.h", HERE / "ops.h", HERE / "tiles_avx512.h", HERE / "tiles_avx2.h"]
# what -march=native is narrowed by when KVFLOW_CPU_ISA asks for less than the CPU has
ISA_FLAGS = {"avx512_vnni": [], "avx2": ["-mno-avx512f"], "generic": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}
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


def target_isa() -> str:
    """The instruction set the library is built for: the CPU's best, or less with $KVFLOW_CPU_ISA."""
    from kvflow.platform import cpu_info
    return cpu_info().kernel_isa


def flags(isa: str) -> list[str]:
    """The compiler's flags for `isa` (on the CPU's own best ISA, the narrowing flags change nothing)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return FLAGS
    return FLAGS + ISA_FLAGS[isa]


def library_path(isa: str | None = None) -> Path:
    isa = isa or target_isa()
    key = hashlib.blake2b(digest_size=8)
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(flags(isa)).encode(),
                 torch.__version__.encode(), _cpu_identity().encode()):
        key.update(part)
    return cache_dir() / f"kvflow_cpu_{isa}_{key.hexdigest()}.so"


def build(path: Path, isa: str | None = None) -> None:
    """Compile the sources into `path` (atomically: a concurrent build never sees a half-written file)."""
    isa = isa or target_isa()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    torch_dir = Path(torch.__file__).parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
                sysconfig.get_paths()["include"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    objdir = tempfile.mkdtemp(dir=path.parent)
    objects = [os.path.join(objdir, f"{src.stem}.o") for src in SOURCES]
    compile_flags = [f for f in flags(isa) if f != "-shared"]
    # the files compile in parallel (each parses torch's headers: most of the time), then link once;
    # torch's own libgomp is linked (the same soname is already loaded): one OpenMP runtime in the process
    compiles = [[cxx, *compile_flags, *(f"-I{p}" for p in includes), "-c", str(src), "-o", obj]
                for src, obj in zip(SOURCES, objects)]
    link = [cxx, "-shared", "-fopenmp", *objects, "-o", tmp, f"-L{torch_dir / 'lib'}",
            f"-Wl,-rpath,{torch_dir / 'lib'}", "-ltorch", "-ltorch_cpu", "-lc10"]
    procs: list[subprocess.Popen] = []
    try:
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for cmd in compiles]
        for cmd, proc in zip(compiles, procs):
            err = proc.communicate()[1]
            if proc.returncode != 0:
                raise RuntimeError(f"building the CPU kernels failed:\n{' '.join(cmd)}\n{err[-4000:]}")
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"linking the CPU kernels failed:\n{' '.join(link)}\n{done.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if os.path.exists(tmp):
            os.unlink(tmp)
        shutil.rmtree(objdir, ignore_errors=True)


def load_library() -> types.SimpleNamespace | None:
    """Build (once) and load the library; its ops as attributes of a namespace, or None when it cannot be
    built here (no compiler, no headers, a read-only home). Ops that need CPU features this machine lacks
    are absent (int4_linear and int8_linear need AVX-512 VNNI or AVX2 + FMA)."""
    try:
        isa = target_isa()
        path = library_path(isa)
        if not path.exists():
            logger.info("building kvflow's CPU kernels for %s into %s (once, 10-40 s)", isa, path)
            start = time.perf_counter()
            build(path, isa)
            logger.info("built kvflow's CPU kernels in %.1f s", time.perf_counter() - start)
        torch.ops.load_library(str(path))
    except Exception as e:            # the callers run their PyTorch code
        logger.warning("kvflow's CPU kernels are unavailable, using the PyTorch path: %s", e)
        return None
    # each op's one overload, called directly: the OpOverloadPacket's Python __call__ adds ~0.2 us a call
    names = [op.name.removeprefix("kvflow::") for op in torch._C._jit_get_all_schemas()
             if op.name.startswith("kvflow::")]
    return types.SimpleNamespace(**{name: getattr(torch.ops.kvflow, name).default for name in names})
