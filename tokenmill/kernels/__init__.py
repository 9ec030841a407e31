"""Triton kernels for the GPU fast path, each matching a PyTorch reference in `tokenmill.layers`.

  write_kv_triton(kv_cache, k, v, slot_mapping)             ~ layers.attention.write_kv (+ slot -1 = skip)
  paged_attention_triton(q, kv_cache, meta, scale)          ~ layers.attention.paged_attention_torch
  rms_norm_triton(x, weight, eps, residual=None)            ~ layers.norm.RMSNorm
  silu_and_mul_triton(gate_up)                              ~ layers.activation.silu_and_mul
  rotary_triton(positions, q, k, cos_cache, sin_cache)      ~ layers.rotary.RotaryEmbedding.forward
  rotary_write_kv_triton(positions, q, k, v, cos, sin, kv_cache, slot_mapping)
                                                            ~ RotaryEmbedding.forward, then write_kv
  gemv.gemv_norm_rope_kv / gemv_linear / gemv_norm_silu     ~ a decoder layer's projections with the
                                                              norms, RoPE, KV write, SiLU and residual
                                                              adds around them (one-token steps)

Dispatch: `paged_attention(...)` and `write_kv(...)` take the torch path's arguments plus
`backend`: "auto" (Triton for CUDA tensors when Triton is installed, else the torch reference),
"triton" or "torch". The switch is explicit; the only environment the kernels read is
TOKENMILL_PDL=0 (no programmatic dependent launches, kernels/pdl.py) and TOKENMILL_GEMV_CONFIGS
(tuned fused-GEMV launch configs, kernels/gemv.py).

Note: the package attribute `paged_attention` is the dispatch function, which shadows the submodule
of the same name for `import tokenmill.kernels.paged_attention as m`; use
`from tokenmill.kernels.paged_attention import ...` or importlib.import_module for the module.

Running the kernels on the CPU: Triton decides at `@triton.jit` time, i.e. when this package is
first imported, whether a kernel is compiled for the GPU or run by its interpreter
(TRITON_INTERPRET=1). So TRITON_INTERPRET=1 must be set before the first import of
`tokenmill.kernels`; `kernels_interpreted()` says which way it went. Interpreted kernels accept
CPU tensors (backend="triton"); compiled ones need CUDA tensors (`check_launchable` says so).
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # the torch reference path still works
    HAS_TRITON = False

_INTERPRETED = False  # set below, once the kernels are defined

BACKENDS = ("auto", "triton", "torch")


def kernels_interpreted() -> bool:
    """True when this package's kernels run under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error instead of a crash when compiled kernels would get CPU tensors."""
    if _INTERPRETED:
        return
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(
                "tokenmill.kernels were compiled for the GPU and got a CPU tensor; to run them on the CPU, "
                "set TRITON_INTERPRET=1 before tokenmill.kernels is first imported")


def use_triton(tensor: torch.Tensor, backend: str = "auto") -> bool:
    """Resolve `backend` for inputs living where `tensor` lives."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and tensor.is_cuda
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package")
    return True


if HAS_TRITON:
    from tokenmill.kernels.fused_ops import (rms_norm_triton, rotary_triton, rotary_write_kv_triton,
                                             silu_and_mul_triton)
    from tokenmill.kernels.kv_cache import _write_kv_kernel, write_kv_triton
    from tokenmill.kernels.paged_attention import paged_attention_triton

    try:
        from triton.runtime.interpreter import InterpretedFunction
        _INTERPRETED = isinstance(_write_kv_kernel, InterpretedFunction)
    except ImportError:  # pragma: no cover - a triton without the interpreter module
        _INTERPRETED = False

from tokenmill.layers.attention import AttentionMetadata, paged_attention_torch
from tokenmill.layers.attention import write_kv as write_kv_torch


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    *, backend: str = "auto") -> torch.Tensor:
    """`paged_attention_torch`'s contract; Triton kernels where `backend` resolves to them."""
    if use_triton(q, backend):
        return paged_attention_triton(q, kv_cache, meta, scale, max_decode_seq_len=meta.max_decode_seq_len)
    return paged_attention_torch(q, kv_cache, meta, scale)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             *, backend: str = "auto") -> None:
    """`write_kv`'s contract, plus slots of -1 are skipped on both backends."""
    if use_triton(k, backend):
        write_kv_triton(kv_cache, k, v, slot_mapping)
        return
    keep = slot_mapping >= 0
    if not bool(keep.all()):  # a device sync, but only on the torch path with padded slots
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    write_kv_torch(kv_cache, k, v, slot_mapping)


__all__ = ["BACKENDS", "HAS_TRITON", "check_launchable", "kernels_interpreted", "paged_attention", "use_triton",
           "write_kv"]
if HAS_TRITON:
    __all__ += ["paged_attention_triton", "rms_norm_triton", "rotary_triton", "rotary_write_kv_triton",
                "silu_and_mul_triton",
                "write_kv_triton"]
