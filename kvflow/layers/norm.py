"""RMSNorm, with the residual add fused into the same call (one pass instead of two per layer)."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x (after adding residual when given). Statistics are computed in fp32, as in HF.

        Returns the normalised tensor, or (normalised, new residual) when a residual is passed."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype) * self.weight
        return out if residual is None else (out, residual)

    __call__ = forward   # no nn.Module hook machinery: ~1 us a call, 61 calls a decode step
