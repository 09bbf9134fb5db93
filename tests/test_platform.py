"""CPU capability detection (kvflow/platform.py), dtype="auto" by it, and where it is shown."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

import kvflow.config as config
from kvflow import platform as kp
from kvflow.config import resolve_dtype
from kvflow.entrypoints.cli import main

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R13 Processor
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7R13 Processor
"""
X86_512 = X86.replace("sha_ni", "avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8")
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes crc32 atomics asimddp sve i8mm bf16
CPU implementer\t: 0x41
"""

AVX2_ONLY = kp.CPUInfo("x86_64", "AMD EPYC 7R13 Processor", 2, ("avx2", "f16c", "fma"))
AVX512_BF16 = kp.CPUInfo("x86_64", "AMD EPYC 9R14", 2,
                         ("avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "f16c", "fma"))


def test_parse_x86_flags():
    model, flags = kp.parse_cpuinfo(X86, "x86_64")
    assert model == "AMD EPYC 7R13 Processor"
    assert flags == ("avx2", "f16c", "fma")           # only the reported ones, sorted
    info = kp.CPUInfo("x86_64", model, 2, flags)
    assert not info.bf16_native and info.best_kernel_isa == "avx2"
    _, flags = kp.parse_cpuinfo(X86_512, "x86_64")
    assert {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"} <= set(flags)
    info = kp.CPUInfo("x86_64", model, 2, flags)
    assert info.bf16_native and info.best_kernel_isa == "avx512_vnni"
    amx_only = kp.CPUInfo("x86_64", "", 2, ("amx_bf16", "avx2", "fma"))
    assert amx_only.bf16_native


def test_parse_arm_and_unknown():
    model, flags = kp.parse_cpuinfo(ARM, "aarch64")
    assert flags == ("bf16", "dotprod", "i8mm", "neon", "sve")
    info = kp.CPUInfo("aarch64", model, 4, flags)
    assert info.bf16_native and info.best_kernel_isa == "generic" and not info.is_x86
    assert kp.parse_cpuinfo("", "aarch64") == ("", ("neon",))
    assert kp.parse_cpuinfo("", "x86_64") == ("", ())
    assert kp.CPUInfo("x86_64", "", 1, ()).best_kernel_isa == "generic"


def test_this_machine_is_cached_and_serialisable():
    info = kp.cpu_info()
    assert kp.cpu_info() is info
    d = kp.capabilities()
    json.dumps(d)
    assert d["arch"] and d["kernel_isa"] in kp.KERNEL_ISAS and "torch_capability" in d
    assert info.model in kp.describe() or not info.model


def test_forced_isa(monkeypatch):
    monkeypatch.delenv(kp.ISA_ENV, raising=False)
    assert AVX512_BF16.kernel_isa == "avx512_vnni"
    monkeypatch.setenv(kp.ISA_ENV, "avx2")
    assert AVX512_BF16.kernel_isa == "avx2" and AVX2_ONLY.kernel_isa == "avx2"
    monkeypatch.setenv(kp.ISA_ENV, "generic")
    assert AVX512_BF16.kernel_isa == "generic"
    monkeypatch.setenv(kp.ISA_ENV, "avx512_vnni")
    with pytest.raises(ValueError, match="only avx2"):
        AVX2_ONLY.kernel_isa
    monkeypatch.setenv(kp.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="must be one of"):
        AVX2_ONLY.kernel_isa
    assert "weight kernels: invalid" in AVX2_ONLY.summary()       # shown, not raised
    assert AVX2_ONLY.to_dict()["kernel_isa"].startswith("invalid")


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU that kvflow.platform reports: cpu(AVX2_ONLY)."""
    monkeypatch.setattr(config, "_warned_bf16", False)

    def use(info):
        monkeypatch.setattr(kp, "cpu_info", lambda: info)
    return use


def test_auto_dtype_without_native_bf16_is_float32(cpu, caplog):
    cpu(AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="kvflow.config"):
        assert resolve_dtype("auto", "cpu") == "float32"
        assert resolve_dtype("float32", "cpu") == "float32"
    assert not caplog.records
    assert resolve_dtype("auto", "cuda") == "bfloat16"


def test_auto_dtype_with_native_bf16_is_bfloat16(cpu, caplog):
    cpu(AVX512_BF16)
    with caplog.at_level(logging.WARNING, logger="kvflow.config"):
        assert resolve_dtype("auto", "cpu") == "bfloat16"
        assert resolve_dtype("bf16", "cpu") == "bfloat16"
    assert not caplog.records


def test_explicit_bf16_without_native_bf16_warns_once(cpu, caplog):
    cpu(AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="kvflow.config"):
        assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
        assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "slower than float32" in msg and "AMD EPYC 7R13" in msg and "float32" in msg
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", "cpu")


def test_config_does_not_import_torch():
    code = ("import sys, kvflow.config as c; c.resolve_dtype('auto', 'cpu'); "
            "from kvflow.platform import describe; describe(with_torch=False); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_capabilities_logged_once(caplog):
    kp.log_capabilities.cache_clear()
    with caplog.at_level(logging.INFO, logger="kvflow.platform"):
        resolve_dtype("float32", "cpu")
        resolve_dtype("auto", "cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "kvflow.platform"]
    assert len(lines) == 1 and lines[0].startswith("CPU: ") and "weight kernels:" in lines[0]


def test_cli_env_and_version(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "flags:" in out and "weight kernels:" in out and "torch cpu capability:" in out
    assert main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cpu"]["flags"] == list(kp.cpu_info().flags) and d["kvflow"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("kvflow ") and "\ncpu: " in out and "bf16 native:" in out
