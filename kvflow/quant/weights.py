"""Weight-only quantization of the linear layers, run by low-bit matmul kernels on the CPU.

For a weight w [N outputs, K inputs]:
- int8: symmetric, one scale per output row: w ~ q * s, q int8 in [-127, 127], s = max|w_row| / 127.
- int4: asymmetric, group-wise along K (32 by default, GGUF's block size): per (row, group)
  w ~ q * s + m with q in 0..15 (Q4_1's convention; Q4_0's d * (q - 8) is s = d, m = -8 d), held as
  (q - 8) * s + z with bf16 s and z, so z = m + 8 s (PyTorch's int4 convention).

Two layouts, chosen when a layer is built:
- "tiles": kvflow's kernels (kernels/cpu.cpp, int4_linear / int8_linear) on CPUs with AVX-512 VNNI:
  rows in tiles of 16, activations quantized per group of 32 into two int8 terms, integer dot products.
- "aten": PyTorch's torch._weight_int8pack_mm(x, q, s) and torch._weight_int4pack_mm_for_cpu(x, packed,
  group, sz) (codes packed once by aten._convert_weight_to_int4pack_for_cpu; bf16 activations, since the
  int4 kernel's fp32 path is scalar code).

The kernels win for a few rows (decode) and lose for many. Above `kernel_max_rows` rows (measured
crossovers, set per layout) a layer dequantizes its weight for that call, 1M weights at a time
(transient pieces), and runs the dense matmul; no dense copy stays resident. The dense path also
serves non-CPU devices.

The logits projection is quantized too, to int8 in both modes (int4 logits cost too many greedy
tokens; for a tied model it is a quantized copy of the embedding, whose lookup stays exact, in the
model's dtype). The GGUF path keeps what the file stores (see linear_from_gguf).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kvflow.kernels import KERNEL_DTYPES, cpu_ops

INT4_GROUP_SIZE = 32
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


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


# ---- the kernels' int4 layout ------------------------------------------------------------------------

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


# ---- modules -------------------------------------------------------------------------------------------

DENSE_PIECE = 1 << 20      # weights dequantized at a time on the many-row path (4 MB in fp32)


@functools.cache
def _vnni_ops():
    """kvflow's kernels when they include the weight matmuls (int4_linear, int8_linear: built on CPUs with
    AVX-512 VNNI only), or None."""
    ops = cpu_ops()
    return ops if ops is not None and hasattr(ops, "int4_linear") else None


def _piecewise_matmul(x: torch.Tensor, n: int, rows: int, weight_t) -> torch.Tensor:
    """x @ W.T for W [n, K], dequantized `rows` rows at a time: weight_t(a, b) gives W[a:b].T in x's dtype.
    Small temporaries stay in the allocator's free lists; one big one is fresh memory every call and
    page-faults (the default model's logits: 17 ms to convert 28M int8 codes at once, 1.6 ms in 12
    pieces)."""
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        out[:, a:b] = torch.matmul(x, weight_t(a, b))
    return out


class _QuantLinear(nn.Module):
    """What Int8Linear and Int4Linear share. A batch-1 decode step makes 120 of these calls, so the
    call skips nn.Module's hook machinery (`__call__ = forward`: no hooks on these modules) and the
    kernel's tensors come from a plain tuple, `_kernel`, not through nn.Module's lookup of registered
    buffers (about 1 us each). `_apply` (to, cuda, float, ...) rebuilds the tuple after moving them.
    Measured: 0.45 ms less per token on the default model (of ~8.5)."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def _refresh(self) -> None:
        raise NotImplementedError


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


class Int8Linear(_QuantLinear):
    """int8 weights, one scale per row. Two layouts, chosen when built:
    - "tiles" (kvflow's kernel, AVX-512 VNNI CPUs, K a multiple of 32): int8 x two-term int8 activations
      (kernels/cpu.cpp, int8_linear);
    - "aten": PyTorch's _weight_int8pack_mm, which converts every weight to the activations' dtype."""
    kernel_max_rows = 16       # the kernel beats q.to(bf16) + a bf16 matmul up to 16-32 rows (2 threads)

    def __init__(self, w: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = w.codes.shape
        if self.in_features % 32 == 0 and w.codes.device.type == "cpu" and _vnni_ops() is not None:
            self.layout = "tiles"
            self.kernel_max_rows = 96   # measured crossover with the dense path: 100-200 rows (12 with a dense copy)
            packed, wsum = pack_int8_tiles(w.codes)
            self.register_buffer("qweight", packed)
            self.register_buffer("wsum", wsum)
            self.register_buffer("scale_f32", F.pad(w.scale.float(), (0, -self.out_features % 16)))
        else:
            self.layout = "aten"
            self.register_buffer("qweight", w.codes)
        self.register_buffer("scale", w.scale.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # a dense copy that is resident anyway (a tied model's embedding): the many-row path uses it
        # instead of converting the codes (28M of them for the default model's logits, per call)
        self.dense_weight: torch.Tensor | None = None
        self._refresh()

    def _refresh(self) -> None:
        if self.layout == "tiles" and self.scale_f32.dtype != torch.float32:
            self.scale_f32 = self.scale_f32.float()
        self._kernel = (self.qweight, self.scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qweight, scale, bias = self._kernel
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        few = x.shape[0] <= self.kernel_max_rows and x.is_cpu
        if few and self.layout == "tiles" and x.dtype in KERNEL_DTYPES:
            out = x.new_empty(x.shape[0], self.out_features)
            _vnni_ops().int8_linear(out, x.contiguous(), qweight, self.wsum, self.scale_f32)
        elif few and self.layout == "aten":
            out = torch._weight_int8pack_mm(x, qweight, scale)
        elif self.dense_weight is not None:
            out = F.linear(x, self.dense_weight)
        else:
            rows = max(16, DENSE_PIECE // self.in_features // 16 * 16)
            out = _piecewise_matmul(x, self.out_features, rows,
                                    lambda a, b: self.codes(a, b).to(x.dtype).t()).mul_(scale)
        return out if bias is None else out + bias

    __call__ = forward

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the codes [N, K] (int8)."""
        stop = self.out_features if stop is None else stop
        if self.layout == "tiles":
            return unpack_int8_tiles(self.qweight, start, stop)
        return self.qweight[start:stop]

    def dequantize(self) -> torch.Tensor:
        return self.codes().float() * self.scale.float()[:, None]


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


class Int4Linear(_QuantLinear):
    """int4 weights, group-wise. Two layouts, chosen when built:
    - "tiles" (kvflow's kernel, on CPUs with AVX-512 VNNI): activations quantized to int8 per group of 32,
      integer dot products, the 4-bit weights read once for all rows (kernels/cpu.cpp, int4_linear);
    - "aten": PyTorch's _weight_int4pack_mm_for_cpu, which converts every code to fp32 (compute-bound:
      ~20 GB/s of weights on 2 cores, against ~80 GB/s of memory bandwidth).
    Both hold the same codes, bf16 scales and zeros, i.e. the same weights."""
    kernel_max_rows = 128      # dequantizing costs more: the kernel wins up to 128-256 rows (2 threads)

    def __init__(self, w: Int4Weight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = w.codes.shape
        self.group_size = self.in_features // w.scale.shape[1]
        device = w.codes.device
        if self.group_size == 32 and device.type == "cpu" and _vnni_ops() is not None:
            self.layout = "tiles"
            self.kernel_max_rows = 64   # measured: even with the dense path at 64-128 rows, faster below
            packed, sz = pack_int4_tiles(w)
        else:
            self.layout = "aten"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes.cpu().to(torch.int32), 8)
            sz = torch.stack([w.scale, w.min + 8 * w.scale], dim=-1).transpose(0, 1).contiguous().bfloat16()
        self.register_buffer("packed", packed.to(device))
        self.register_buffer("scale_zeros", sz.to(device))      # aten: [K / group, N, 2]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._refresh()

    def _refresh(self) -> None:
        if self.scale_zeros.dtype != torch.bfloat16:   # the kernel's format, whatever dtype the model moves to
            self.scale_zeros = self.scale_zeros.bfloat16()
        self._kernel = (self.packed, self.group_size, self.scale_zeros, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, group_size, scale_zeros, bias = self._kernel
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        few = x.shape[0] <= self.kernel_max_rows and x.is_cpu
        if few and self.layout == "tiles" and x.dtype in KERNEL_DTYPES:
            out = x.new_empty(x.shape[0], self.out_features)
            _vnni_ops().int4_linear(out, x.contiguous(), packed, scale_zeros)
        elif few and self.layout == "aten" or (x.is_cpu and self.layout == "aten" and not int4_unpack_ok()):
            if x.dtype == torch.bfloat16:
                out = torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)
            else:
                out = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, group_size,
                                                        scale_zeros).to(x.dtype)
        else:
            rows = max(64, DENSE_PIECE // self.in_features // 64 * 64)   # whole packed blocks
            out = _piecewise_matmul(x, self.out_features, rows, lambda a, b: self.dequantize_t(x.dtype, a, b))
        return out if bias is None else out + bias

    __call__ = forward

    def codes(self) -> torch.Tensor:
        """The codes [N, K] (uint8, 0..15)."""
        if self.layout == "tiles":
            return unpack_int4_tiles(self.packed.cpu())
        return unpack_int4(self.packed.cpu(), self.out_features, self.in_features)

    def dequantize_t(self, dtype: torch.dtype = torch.float32, start: int = 0,
                     stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the weight, transposed ([K, stop - start]), as the kernels see them
        ((q - 8) * s + z in fp32), cast to dtype. start must begin a packed block (a multiple of 64).
        The scales are made contiguous first, or the broadcasts crawl."""
        k, g = self.in_features, self.group_size
        stop = self.out_features if stop is None else stop
        n = stop - start
        if self.layout == "tiles":
            out = torch.empty(n, k, dtype=dtype if dtype in KERNEL_DTYPES else torch.float32)
            cpu_ops().int4_dequantize(out, self.packed.cpu(), self.scale_zeros.cpu(), start // 16)
            return out.t().to(self.packed.device, dtype)
        q = unpack_int4(self.packed[start:stop], n, k).t().reshape(k // g, g, n).float().sub_(8)
        sz = self.scale_zeros[:, start:stop].float()
        scale, zero = sz[..., 0].contiguous()[:, None, :], sz[..., 1].contiguous()[:, None, :]
        return torch.addcmul(zero, q, scale).view(k, n).to(dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in fp32."""
        return self.dequantize_t().t()


QuantLinear = Int8Linear | Int4Linear


def quantize_linear(w: torch.Tensor, bias: torch.Tensor | None, method: str, dtype: torch.dtype) -> QuantLinear:
    """int4 when the kernel takes the shape (N a multiple of 16, K of the group size), else int8."""
    n, k = w.shape
    if method == "int4" and n % 16 == 0 and k % INT4_GROUP_SIZE == 0:
        return Int4Linear(quantize_int4(w), bias)
    return Int8Linear(quantize_int8(w, dtype), bias, dtype)


def _logits_weight(model) -> torch.Tensor:
    return model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


@torch.no_grad()
def quantize_model(model, method: str) -> None:
    """Replace, in place, every decoder linear layer by its `method` form, and the logits projection by
    an int8 one."""
    dtype = model.embed_tokens.weight.dtype
    for layer in model.layers:
        for path in LINEARS:
            parent, attr = _parent(layer, path)
            lin = getattr(parent, attr)
            setattr(parent, attr, quantize_linear(lin.weight.data, lin.bias, method, dtype))
    # int8 even in int4 mode: an int4 logits projection cut greedy agreement with the fp32 model from
    # 0.55 to 0.13 on the default model (8 prompts x 32 tokens); int8 costs ~0.4 ms a token more
    _set_logits(model, quantize_linear(_logits_weight(model).data, None, "int8", dtype))


# ---- GGUF blocks kept quantized ------------------------------------------------------------------------

_GGUF_SHARDS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn.o_proj": ("self_attn.o_proj",),
                "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                "mlp.down_proj": ("mlp.down_proj",)}


def linear_from_gguf(blocks: list, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
    """One linear layer from the GGUF blocks of its shards (rows concatenated, e.g. q, k, v).

    All shards Q4_0 / Q4_1: int4 with group 32, codes, scales and mins taken as stored (exact up to the
    kernel's bf16 scale and zero). Otherwise (Q8_0, or a mix): the stored values are decoded in fp32
    (exact) and requantized to int8 per row: for Q8_0 the row's scale is its largest block scale, so
    that block keeps its codes and the others' move by at most half a step."""
    n = sum(b.codes.shape[0] for b in blocks)
    if all(b.kind in ("Q4_0", "Q4_1") for b in blocks) and n % 16 == 0:
        def cat(attr: str) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([getattr(b, attr) for b in blocks]))
        return Int4Linear(Int4Weight(cat("codes"), cat("scale"), cat("min")), bias)
    w = torch.cat([torch.from_numpy(b.dequantize()) for b in blocks])
    return Int8Linear(quantize_int8(w, dtype), bias, dtype)


@torch.no_grad()
def quantize_model_from_gguf(model, get_blocks: Callable[[list[str]], dict]) -> set[str]:
    """Install quantized layers built from GGUF blocks before the rest of the weights load.

    get_blocks(names) returns {Hugging Face name: GGUFBlocks} for those of `names` stored as Q4_0, Q4_1
    or Q8_0. A layer whose shards are not all stored so stays dense (dequantized as before). The logits
    projection comes from output.weight, or from token_embd for a tied model (whose embedding lookup
    still loads dense). Returns the names consumed here, which the dense loader must skip."""
    dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
    consumed: set[str] = set()
    for i, layer in enumerate(model.layers):
        for path, shards in _GGUF_SHARDS.items():
            names = [f"model.layers.{i}.{s}.weight" for s in shards]
            blocks = get_blocks(names)
            if len(blocks) < len(names):
                continue
            parent, attr = _parent(layer, path)
            setattr(parent, attr, linear_from_gguf([blocks[nm] for nm in names], getattr(parent, attr).bias,
                                                   dtype).to(device))
            consumed.update(names)
    name = "model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight"
    blocks = get_blocks([name])
    if blocks:
        _set_logits(model, linear_from_gguf([blocks[name]], None, dtype).to(device))
        if name == "lm_head.weight":
            consumed.add(name)
    return consumed


def _set_logits(model, lin: QuantLinear) -> None:
    """Install the logits projection; a tied model's embedding (kept for the exact lookup) also serves
    the many-row path (prompt logprobs, big decode batches)."""
    if model.lm_head is None and isinstance(lin, Int8Linear):
        lin.dense_weight = model.embed_tokens.weight.data
        if lin.layout == "tiles":
            lin.kernel_max_rows = 12    # a bf16 matmul on the resident copy wins from 8-16 rows (measured)
    model.lm_head = lin


def _parent(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, attr = path.split(".")
    for p in parents:
        module = getattr(module, p)
    return module, attr
