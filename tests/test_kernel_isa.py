"""The weight kernels' variants per instruction set (kvflow/kernels/weights.cpp, tiles_avx512.h,
tiles_avx2.h): the build has the CPU's best variant, and on an AVX-512 machine the AVX2 variant, forced by
KVFLOW_CPU_ISA=avx2 in a child process (one library per process), passes the kernel tests and gives the
same results bit for bit (both compute exact integer dots, then the same fp32 operations)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvflow.kernels as dispatch
from kvflow.platform import cpu_info

ROOT = Path(__file__).resolve().parents[1]
ops = dispatch.load_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="the CPU kernels could not be built here")
can_avx2 = cpu_info().has("avx2", "fma") and cpu_info().is_x86


def weight_outputs() -> dict[str, torch.Tensor]:
    """int4_linear and int8_linear on fixed inputs (with outlier channels, and an int8 code of -128, as a
    GGUF Q8_0 block may hold), for several row counts and both dtypes."""
    from kvflow.quant.formats import pack_int4_tiles, pack_int8_tiles, quantize_int4, quantize_int8
    ops = dispatch.load_ops()
    g = torch.Generator().manual_seed(0)
    w4 = quantize_int4(torch.randn(208, 576, generator=g) * 0.05)
    packed4, sz = pack_int4_tiles(w4)
    w8 = quantize_int8(torch.randn(200, 576, generator=g) * 0.05)
    codes8 = w8.codes.clone()
    codes8[5, :64] = -128
    packed8, wsum = pack_int8_tiles(codes8)
    scale = F.pad(w8.scale.float(), (0, 8))
    out = {}
    for rows in (1, 3, 17, 64):
        x = torch.randn(rows, 576, generator=g)
        x[:, 7] = 40.0
        x[:, 100] = -50.0
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            y4 = torch.empty(rows, 208, dtype=dtype)
            ops.int4_linear(y4, xd, packed4, sz)
            y8 = torch.empty(rows, 200, dtype=dtype)
            ops.int8_linear(y8, xd, packed8, wsum, scale)
            out[f"int4_{rows}_{dtype}"], out[f"int8_{rows}_{dtype}"] = y4, y8
            ref8 = xd.float() @ (codes8.float() * w8.scale[:, None]).t()
            out[f"ref8_{rows}_{dtype}"] = ref8
    return out


def _child(isa: str, code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVFLOW_CPU_ISA": isa}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_kernels
def test_the_build_has_the_cpus_variant():
    expected = {"avx512_vnni": "avx512_vnni", "avx2": "avx2", "generic": "none"}[cpu_info().kernel_isa]
    assert ops.weight_tiles() == expected == dispatch.weight_tiles()
    assert hasattr(ops, "int4_linear") == (expected != "none") == hasattr(ops, "int8_linear")
    from kvflow.kernels.build import library_path
    assert f"_{cpu_info().kernel_isa}_" in library_path().name          # the cache key names the ISA


def test_the_cache_key_and_flags_follow_the_isa():
    from kvflow.kernels import build
    assert build.library_path("avx2") != build.library_path("avx512_vnni")
    if cpu_info().is_x86:
        assert "-mno-avx512f" in build.flags("avx2") and build.flags("avx512_vnni") == build.FLAGS


@needs_kernels
@pytest.mark.skipif(not hasattr(ops, "int4_linear") if ops else True, reason="no weight kernels here")
def test_int8_linear_takes_minus_128_codes():
    out = weight_outputs()
    for key, ref in out.items():
        if key.startswith("ref8_"):
            y = out[key.replace("ref8", "int8")].float()
            assert ((y - ref).abs().max() / ref.abs().max()).item() < (5e-4 if "float32" in key else 1e-2), key


@needs_kernels
@pytest.mark.skipif(not can_avx2, reason="needs AVX2 and FMA")
def test_forced_avx2_variant_is_bit_identical_and_passes_the_kernel_tests(tmp_path):
    if ops.weight_tiles() == "avx2":
        pytest.skip("this process's build is the AVX2 variant: tests/test_cpu_kernels.py has run it")
    dump = tmp_path / "avx2.pt"
    code = ("import torch, kvflow.kernels as k; from tests.test_kernel_isa import weight_outputs; "
            f"assert k.load_ops().weight_tiles() == 'avx2'; torch.save(weight_outputs(), {str(dump)!r})")
    proc = _child("avx2", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(dump)
    if ops.weight_tiles() == "avx512_vnni":
        mine = weight_outputs()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
    # every kernel's own tests (tolerances against the PyTorch reference) on the AVX2 build: the weight
    # tiles, and the norms, rotary, KV write, decode attention and activation compiled for AVX2+FMA
    proc = _child("avx2", "import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
                  "'tests/test_cpu_kernels.py']))")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-1000:]


@needs_kernels
@pytest.mark.skipif(not cpu_info().is_x86, reason="the generic build is x86's fallback without AVX2")
def test_generic_build_passes_the_kernel_tests_without_weight_tiles():
    """The plain C++ build (no AVX2, no AVX-512) that other x86 processors get: no weight tiles (PyTorch's
    int4 path instead), every other kernel within its tolerances."""
    proc = _child("generic", "import sys, pytest, kvflow.kernels as k; assert k.load_ops().weight_tiles() == "
                  "'none'; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_cpu_kernels.py', "
                  "'-k', 'not int4 and not int8']))")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout, proc.stdout[-1000:]
