"""Triton kernel that stores this step's k/v into the paged KV cache (the `write_kv` of the torch path).

Same semantics as `tokenmill.layers.attention.write_kv`, plus: a slot of -1 (any negative slot)
means "skip this token", so a CUDA-graph batch padded with dummy tokens writes nothing for them.
k and v may be strided views (e.g. the k/v parts of a fused qkv projection); only the last
dimension must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels import check_launchable


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cslot, stride_ch,
    num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)
    tok = token.to(tl.int64)
    k = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = cache_ptr + slot * stride_cslot + offs_h[:, None] * stride_ch + offs_d[None, :]
    # Through fp32: a cast between equal dtypes is free, and the interpreter has no bf16 arithmetic.
    tl.store(dst, k.to(tl.float32).to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(tl.float32).to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v ([T, Hkv, D]) at `slot_mapping` ([T] int64; -1 = skip) of kv_cache [2, N, B, Hkv, D]."""
    two, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    assert two == 2, "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]"
    num_tokens = k.shape[0]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and v.shape == k.shape, (k.shape, v.shape)
    assert slot_mapping.shape == (num_tokens,), slot_mapping.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "the head dimension of k and v must be contiguous"
    # The slot index addresses (block, offset) as one flat dimension: those two must be dense.
    assert kv_cache.stride(1) == block_size * kv_cache.stride(2) and kv_cache.stride(4) == 1
    if num_tokens == 0:
        return
    check_launchable(kv_cache, k, v, slot_mapping)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
