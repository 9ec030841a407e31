"""SiLU-and-multiply over the fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels import use_triton

try:
    from tokenmill.kernels import silu_and_mul_triton
except ImportError:  # no triton: only the torch path exists
    silu_and_mul_triton = None


def silu_and_mul(gate_up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """silu(gate) * up, where gate_up = [gate | up] along the last dimension."""
    if use_triton(gate_up, backend):
        return silu_and_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
