"""Weight-only quantized linear layers (Int8Linear, Int4Linear) and `quantize_model`, which installs them.

Formats and packings: quant/formats.py. Two layouts, chosen when a layer is built:
- "tiles": kvflow's kernels (kernels/weights.cpp, int4_linear / int8_linear) on CPUs with AVX-512 VNNI
  or AVX2 + FMA (one variant per instruction set, identical results):
  rows in tiles of 16, activations quantized per group of 32 into two int8 terms, integer dot products.
- "aten": PyTorch's torch._weight_int8pack_mm(x, q, s) and torch._weight_int4pack_mm_for_cpu(x, packed,
  group, sz) (codes packed once by aten._convert_weight_to_int4pack_for_cpu; bf16 activations, since the
  int4 kernel's fp32 path is scalar code). Also the layout of a layer built while kvflow's kernels are
  off (kvflow.kernels): the reference path.

The kernels win for a few rows (decode) and lose for many. Above `kernel_max_rows` rows (measured
crossovers, set per layout) a layer dequantizes its weight for that call, 1M weights at a time
(transient pieces), and runs the dense matmul; no dense copy stays resident. The dense path also
serves non-CPU devices, and a "tiles" layer while the kernels are turned off.

The logits projection is quantized too, to int8 in both modes (int4 logits cost too many greedy
tokens; for a tied model it is a quantized copy of the embedding, whose lookup stays exact, in the
model's dtype). The GGUF path keeps what the file stores (quant/gguf_repack.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.kernels import KERNEL_DTYPES, kernel_ops, kernel_ops_for
from kvflow.quant.formats import (
    INT4_GROUP_SIZE,
    Int4Weight,
    Int8Weight,
    dequantize_int4_tiles,
    int4_unpack_ok,
    pack_int4_tiles,
    pack_int8_tiles,
    quantize_int4,
    quantize_int8,
    unpack_int4,
    unpack_int4_tiles,
    unpack_int8_tiles,
)

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
DENSE_PIECE = 1 << 20      # weights dequantized at a time on the many-row path (4 MB in fp32)


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


class Int8Linear(_QuantLinear):
    """int8 weights, one scale per row. Two layouts, chosen when built:
    - "tiles" (kvflow's kernel, AVX-512 VNNI or AVX2 CPUs, K a multiple of 32): int8 x two-term int8 activations
      (kernels/cpu.cpp, int8_linear);
    - "aten": PyTorch's _weight_int8pack_mm, which converts every weight to the activations' dtype."""
    kernel_max_rows = 16       # the kernel beats q.to(bf16) + a bf16 matmul up to 16-32 rows (2 threads)

    def __init__(self, w: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = w.codes.shape
        if self.in_features % 32 == 0 and kernel_ops_for(w.codes.device, "int8_linear") is not None:
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
        ops = kernel_ops(x) if few and self.layout == "tiles" else None
        if ops is not None:
            out = x.new_empty(x.shape[0], self.out_features)
            ops.int8_linear(out, x.contiguous(), qweight, self.wsum, self.scale_f32)
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


class Int4Linear(_QuantLinear):
    """int4 weights, group-wise. Two layouts, chosen when built:
    - "tiles" (kvflow's kernel, on CPUs with AVX-512 VNNI or AVX2): activations quantized to int8 per group of 32,
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
        if self.group_size == 32 and kernel_ops_for(device, "int4_linear") is not None:
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
        ops = kernel_ops(x) if few and self.layout == "tiles" else None
        if ops is not None:
            out = x.new_empty(x.shape[0], self.out_features)
            ops.int4_linear(out, x.contiguous(), packed, scale_zeros)
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
            ops = kernel_ops(out)
            if ops is not None:
                ops.int4_dequantize(out, self.packed.cpu(), self.scale_zeros.cpu(), start // 16)
            else:
                out = dequantize_int4_tiles(self.packed.cpu(), self.scale_zeros.cpu(), start, stop).to(out.dtype)
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


@torch.no_grad()
def quantize_model(model, method: str) -> None:
    """Replace, in place, every decoder linear layer by its `method` form, and the logits projection by
    an int8 one."""
    dtype = model.embed_tokens.weight.dtype
    for layer in model.layers:
        for path in LINEARS:
            parent, attr = parent_module(layer, path)
            lin = getattr(parent, attr)
            setattr(parent, attr, quantize_linear(lin.weight.data, lin.bias, method, dtype))
    # int8 even in int4 mode: an int4 logits projection cut greedy agreement with the fp32 model from
    # 0.55 to 0.13 on the default model (8 prompts x 32 tokens); int8 costs ~0.4 ms a token more
    logits = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    set_logits(model, quantize_linear(logits.data, None, "int8", dtype))


def set_logits(model, lin: QuantLinear) -> None:
    """Install the logits projection; a tied model's embedding (kept for the exact lookup) also serves
    the many-row path (prompt logprobs, big decode batches)."""
    if model.lm_head is None and isinstance(lin, Int8Linear):
        lin.dense_weight = model.embed_tokens.weight.data
        if lin.layout == "tiles":
            lin.kernel_max_rows = 12    # a bf16 matmul on the resident copy wins from 8-16 rows (measured)
    model.lm_head = lin


def parent_module(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module that holds `path`'s last part, that part's name), e.g. (layer.mlp, "down_proj")."""
    *parents, attr = path.split(".")
    for p in parents:
        module = getattr(module, p)
    return module, attr
