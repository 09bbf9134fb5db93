"""Rotary position embedding (rotate-half layout, as Hugging Face Llama), with Llama-3 frequency scaling."""
import math

import torch
from torch import nn

from kvflow.kernels import kernel_ops


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.max_position, self.theta, self.scaling = head_dim, max_position, theta, scaling
        if torch.empty(0).is_meta:      # built on the meta device (models/loader.py), which then calls build()
            # for real: computing the tables here would cost ~1.4 s of meta-tensor decompositions at start
            self.register_buffer("cos", torch.empty(max_position, head_dim), persistent=False)
            self.register_buffer("sin", torch.empty(max_position, head_dim), persistent=False)
        else:
            self.build(None)

    def build(self, device: torch.device | str | None) -> None:
        """(Re)compute the cos/sin tables, in fp32 (also after the model was built on the meta device)."""
        head_dim, theta, scaling = self.head_dim, self.theta, self.scaling
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        freqs = torch.outer(torch.arange(self.max_position, dtype=torch.float32, device=device), inv_freq)
        # full head_dim tables (rotate-half layout): cos repeated, sin negated for the first half, so that
        # rotate(x) = x * cos + roll(x, D/2) * sin  (the same numbers as x1 cos - x2 sin, x2 cos + x1 sin)
        self.register_buffer("cos", torch.cat([freqs.cos(), freqs.cos()], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([-freqs.sin(), freqs.sin()], dim=-1), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables' rows for positions [T], as [T, 1, D]: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """rope: cos_sin(positions); x: [T, H, D] (q, k, or both side by side). Returns x rotated, in its
        dtype; the math is fp32, in 6 ops (per-op dispatch dominates at decode sizes), or on the CPU in one
        kernel that rotates x in place."""
        cos, sin = rope
        ops = kernel_ops(x) if x.stride(-1) == 1 else None
        if ops is not None:
            ops.rotary_(x, cos, sin)        # in place, the same arithmetic in one op
            return x
        xf = x.float()
        return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)

    __call__ = forward   # no nn.Module hook machinery: ~1 us a call, one call a layer a step
