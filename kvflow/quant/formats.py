"""Weight formats of the quantized linear layers: the int8 / int4 quantizers, and the packed layouts the
matmul kernels read (kvflow's "tiles", PyTorch's "aten" int4 packing), each with its inverse.

For a weight w [N outputs, K inputs]:
- int8: symmetric, one scale per output row: w ~ q * s, q int8 in [-127, 127], s = max|w_row| / 127.
- int4: asymmetric, group-wise along K (32 by default, GGUF's block size): per (row, group)
  w ~ q * s + m with q in 0..15 (Q4_1's convention; Q4_0's d * (q - 8) is s = d, m = -8 d), held as
  (q - 8) * s + z with bf16 s and z, so z = m + 8 s (PyTorch's int4 convention).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_GROUP_SIZE = 32


# ---- formats and quantizers ----------------------------------------------------------------------------

@dataclass
class Int8Weight:
    codes: torch.Tensor    # int8 [N, K]
    scale: torch.Tensor    # float32 [N]: w = codes * scale

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]


@dataclass
class Int4Weight:
    codes: torch.Tensor    # uint8 [N, K], values 0..15
    scale: torch.Tensor    # float32 [N, K // group]
    min: torch.Tensor      # float32 [N, K // group]: w = codes * scale + min, per group

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        q = self.codes.view(n, self.scale.shape[1], -1).float()
        return (q * self.scale[..., None] + self.min[..., None]).view(n, k)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> Int8Weight:
    """Per-row absmax / 127. The scale is rounded to `scale_dtype` (what the kernel reads) before the
    codes are chosen against it."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_(min=1e-12).to(scale_dtype).float()
    codes = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Weight(codes, scale)


def quantize_int4(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """Per (row, group) min and (max - min) / 15. Scale and zero are rounded to bf16 as the kernel reads
    them, and the codes are chosen against the rounded values."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_(min=1e-12).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    lo = zero - 8 * scale                       # the minimum the kernel will effectively use
    codes = ((wg - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return Int4Weight(codes.view(n, k), scale, lo)


# ---- PyTorch's int4 layout ("aten") ----------------------------------------------------------------------

def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes [n, k] (uint8; a transposed view) back from aten._convert_weight_to_int4pack_for_cpu's layout:
    blocks of BLOCK_N rows (64 with AVX512, 32 with AVX2) stored as [k, BLOCK_N / 2] bytes whose low
    nibbles hold the block's first half of rows and high nibbles its second half; a last partial block
    (and every block on other CPUs) stores row pairs, 2j in the low nibble and 2j + 1 in the high one.
    The layout is [k, n]-major, so the codes come back as the transpose of a [k, n] tensor."""
    cap = torch.backends.cpu.get_cpu_capability()
    bn = 64 if cap.startswith("AVX512") else 32
    full = n // bn * bn if cap.startswith(("AVX512", "AVX2")) else 0
    flat, parts = packed.reshape(-1), []
    if full:
        b = flat[:full * k // 2].view(full // bn, k, bn // 2)
        parts.append(torch.cat([b & 15, b >> 4], dim=-1).permute(1, 0, 2).reshape(k, full))
    for start in range(full, n, bn):
        rows = min(bn, n - start)
        b = flat[start * k // 2:(start + rows) * k // 2].view(k, rows // 2)
        parts.append(torch.stack([b & 15, b >> 4], dim=-1).view(k, rows))
    return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).t()


@functools.cache
def int4_unpack_ok() -> bool:
    """Whether unpack_int4 inverts this CPU's packing (checked once on a matrix with a partial block).
    If not, int4 layers run the kernel at every batch size (correct, slower for prefill)."""
    codes = torch.randint(0, 16, (80, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    try:
        return torch.equal(unpack_int4(packed, 80, 64), codes.to(torch.uint8))
    except RuntimeError:
        return False


# ---- kvflow's layouts ("tiles", kernels/cpu.cpp) -----------------------------------------------------------

def pack_int8_tiles(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kvflow's int8 layout (kernels/cpu.cpp, int8_linear), N padded to a multiple of 16: packed
    [N / 16, K / 4, 64] int8, vector j of a tile holding at byte 4 r + b the code of row r, k = 4 j + b;
    wsum [N / 16, K / 32, 16] int32, the sum of each (row, group of 32)'s codes."""
    n, k = codes.shape
    codes = F.pad(codes, (0, 0, 0, -n % 16))
    t = codes.shape[0] // 16
    packed = codes.view(t, 16, k // 4, 4).transpose(1, 2).contiguous().view(t, k // 4, 64)
    wsum = codes.view(t, 16, k // 32, 32).sum(-1, dtype=torch.int32).transpose(1, 2).contiguous()
    return packed, wsum


def unpack_int8_tiles(packed: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of the codes (start a multiple of 16) back from pack_int8_tiles' layout."""
    t, k4 = packed.shape[:2]
    stop = t * 16 if stop is None else stop
    tiles = packed[start // 16:-(-stop // 16)]
    rows = tiles.view(-1, k4, 16, 4).transpose(1, 2).reshape(-1, k4 * 4)
    return rows[:stop - start // 16 * 16]


def pack_int4_tiles(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """kvflow's int4 layout (kernels/cpu.cpp, int4_linear): rows in tiles of 16, groups of 32 along K.
    packed [N / 16, K / 32, 4, 64] uint8: vector p of a (tile, group) holds at byte 4 r + b the code of row
    r, k = 8p + b in its low nibble and k = 8p + 4 + b in its high one; scale_zero [N / 16, K / 32, 2, 16]
    bf16: the tile's scales, then its zeros z = min + 8 s (w = (q - 8) s + z, as PyTorch's int4 kernel)."""
    n, k = w.codes.shape
    c = w.codes.view(n // 16, 16, k // 32, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)     # [T, G, p, r, b, lo/hi]
    packed = (c[..., 0] | (c[..., 1] << 4)).contiguous().view(n // 16, k // 32, 4, 64)
    sz = torch.stack([w.scale, w.min + 8 * w.scale]).view(2, n // 16, 16, k // 32)
    return packed, sz.permute(1, 3, 0, 2).contiguous().bfloat16()


def unpack_int4_tiles(packed: torch.Tensor) -> torch.Tensor:
    """The codes [N, K] (uint8) back from pack_int4_tiles' layout."""
    t, g = packed.shape[:2]
    b = packed.view(t, g, 4, 16, 4)
    codes = torch.stack([b & 15, b >> 4], dim=3)                                   # [T, G, p, lo/hi, r, b]
    return codes.permute(0, 4, 1, 2, 3, 5).reshape(t * 16, g * 32)


def dequantize_int4_tiles(packed: torch.Tensor, scale_zero: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) (multiples of 16) of the weight [stop - start, K] in fp32 from pack_int4_tiles'
    layout: (q - 8) * s + z, rounded as the int4_dequantize kernel rounds (the PyTorch path of it)."""
    tiles = slice(start // 16, stop // 16)
    codes = unpack_int4_tiles(packed[tiles])
    n, k = codes.shape
    sz = scale_zero[tiles].float()                                                  # [T, G, 2, 16]
    scale = sz[:, :, 0].transpose(1, 2).reshape(n, k // 32, 1)
    zero = sz[:, :, 1].transpose(1, 2).reshape(n, k // 32, 1)
    return codes.view(n, k // 32, 32).float().sub_(8).mul_(scale).add_(zero).view(n, k)
