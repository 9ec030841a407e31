"""RMSNorm, with the residual add fused into the same call (the shape fused kernels will take)."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels import use_triton

try:
    from tokenmill.kernels import rms_norm_triton
except ImportError:  # no triton: only the torch path exists
    rms_norm_triton = None


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 as HF Llama does, then cast back.
    `backend` picks the fused Triton kernel or this PyTorch reference (see tokenmill.kernels)."""

    def __init__(self, size: int, eps: float, backend: str = "torch"):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual), the pre-norm block's two outputs."""
        if use_triton(x, self.backend):
            return rms_norm_triton(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
