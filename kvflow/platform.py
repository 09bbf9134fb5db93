"""What this machine's processor can do: its model and the instruction-set flags kvflow chooses by.

Read once from /proc/cpuinfo (Linux; elsewhere only the architecture is known) and cached. This module
does not import torch (kvflow/config.py uses it to resolve dtype="auto"); `torch_capability()` asks
PyTorch (`torch.backends.cpu.get_cpu_capability()`, e.g. "AVX512") and imports it only when called.

Flags reported (names as below, whatever /proc/cpuinfo calls them):
- x86: avx2, fma, f16c, avx512f, avx512bw, avx512_vnni, avx512_bf16, amx_tile, amx_bf16, amx_int8
- ARM: neon, dotprod, i8mm, bf16, sve

Rules read from them:
- `bf16_native`: the processor multiplies bf16 itself (AVX-512 BF16 or AMX-BF16 on x86; ARM's BF16
  extension). Elsewhere PyTorch converts bf16 to fp32 for every matmul and bf16 is slower than fp32.
- `kernel_isa`: which variant of the int4/int8 weight kernels this machine builds: "avx512_vnni",
  "avx2" (AVX2 + FMA), or "generic" (none: the quantized layers use PyTorch's kernels).
  `KVFLOW_CPU_ISA=avx2` (or generic) forces a lesser variant, e.g. to test the AVX2 kernels on an
  AVX-512 machine; kvflow/kernels/build.py compiles for it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

# /proc/cpuinfo name -> reported name
_X86_FLAGS = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
              "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "amx_tile": "amx_tile",
              "amx_bf16": "amx_bf16", "amx_int8": "amx_int8"}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve"}
KERNEL_ISAS = ("avx512_vnni", "avx2", "generic")      # best first
ISA_ENV = "KVFLOW_CPU_ISA"


@dataclass(frozen=True)
class CPUInfo:
    arch: str                   # platform.machine(): x86_64, aarch64, arm64, ...
    model: str                  # "AMD EPYC 9R14 96-Core Processor", or "" when unknown
    cores: int                  # os.cpu_count()
    flags: tuple[str, ...]      # the reported flags this processor has, sorted

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i686", "i386")

    @property
    def bf16_native(self) -> bool:
        """bf16 matmuls in hardware: AVX-512 BF16 or AMX-BF16 (x86), the BF16 extension (ARM)."""
        return self.has("avx512_bf16") or self.has("amx_bf16") or (not self.is_x86 and self.has("bf16"))

    @property
    def best_kernel_isa(self) -> str:
        if self.has("avx512f", "avx512bw", "avx512_vnni"):
            return "avx512_vnni"
        if self.has("avx2", "fma"):
            return "avx2"
        return "generic"

    @property
    def kernel_isa(self) -> str:
        """The weight kernels' variant: the best this CPU runs, or a lesser one forced by $KVFLOW_CPU_ISA."""
        return forced_isa(self.best_kernel_isa)

    def _kernel_isa_or_error(self) -> str:
        try:
            return self.kernel_isa
        except ValueError as e:       # a bad $KVFLOW_CPU_ISA: the kernels' build reports it too
            return f"invalid ({e})"

    def summary(self) -> str:
        """One line: model, cores, flags, bf16 and kernel choices."""
        model = self.model or "unknown processor"
        flags = " ".join(self.flags) or "none"
        return (f"{model} ({self.arch}, {self.cores} cores); flags: {flags}; "
                f"bf16 native: {'yes' if self.bf16_native else 'no'}; weight kernels: {self._kernel_isa_or_error()}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flags"] = list(self.flags)
        d.update(bf16_native=self.bf16_native, kernel_isa=self._kernel_isa_or_error())
        return d


def forced_isa(best: str) -> str:
    """`best`, or the variant $KVFLOW_CPU_ISA asks for when that is one this CPU runs (a lesser one)."""
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if not want or want in ("native", "auto"):
        return best
    if want not in KERNEL_ISAS:
        raise ValueError(f"{ISA_ENV} must be one of native, {', '.join(KERNEL_ISAS)} (got {want!r})")
    if KERNEL_ISAS.index(want) < KERNEL_ISAS.index(best):
        raise ValueError(f"{ISA_ENV}={want}: this CPU has only {best}")
    return want


def parse_cpuinfo(text: str, arch: str) -> tuple[str, tuple[str, ...]]:
    """(model, reported flags) from the text of /proc/cpuinfo (its first processor)."""
    model, raw = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif not raw and key in ("flags", "features"):
            raw = set(value.split())
    table = _X86_FLAGS if arch.lower() in ("x86_64", "amd64", "i686", "i386") else _ARM_FLAGS
    flags = {name for raw_name, name in table.items() if raw_name in raw}
    if table is _ARM_FLAGS and arch.lower() in ("aarch64", "arm64"):
        flags.add("neon")               # every AArch64 processor has Advanced SIMD
    return " ".join(model.split()), tuple(sorted(flags))


@functools.lru_cache(maxsize=1)
def cpu_info() -> CPUInfo:
    """This machine's CPUInfo, read once."""
    arch = platform.machine() or "unknown"
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pass
    model, flags = parse_cpuinfo(text, arch)
    if not model:
        model = platform.processor() or ""
    if sys.platform == "darwin" and arch == "arm64":
        flags = tuple(sorted({"neon", "dotprod", *flags}))   # every Apple M processor
    return CPUInfo(arch, model, os.cpu_count() or 1, flags)


def torch_capability() -> str | None:
    """PyTorch's own reading of the CPU ("AVX512", "AVX2", "DEFAULT", ...); imports torch."""
    try:
        import torch
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:         # an old torch, or none
        return None


def capabilities(with_torch: bool = True) -> dict:
    """What benchmarks record and `kvflow env` prints: cpu_info() as a dict, plus PyTorch's capability."""
    d = cpu_info().to_dict()
    if with_torch:
        d["torch_capability"] = torch_capability()
    return d


def describe(with_torch: bool = True) -> str:
    """One line for headers and logs."""
    line = cpu_info().summary()
    if with_torch:
        line += f"; torch: {torch_capability()}"
    return line


@functools.lru_cache(maxsize=1)
def log_capabilities() -> None:
    """Log the CPU line once per process (INFO), at engine start."""
    logger.info("CPU: %s", describe(with_torch="torch" in sys.modules))


def main() -> None:      # python -m kvflow.platform
    print(json.dumps(capabilities(), indent=2))


if __name__ == "__main__":
    main()
