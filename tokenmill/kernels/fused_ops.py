"""Fused elementwise kernels: RMSNorm (+ residual add), SiLU-and-mul, rotary embedding.

Each reproduces the rounding steps of its PyTorch reference in `tokenmill.layers`, so bf16/fp16
results match it bit for bit up to the last-ulp differences of fp32 transcendental functions.
All three launch with enable_fp_fusion=False: otherwise the compiler narrows "fp32 op, then round
to bf16" into native bf16 instructions and fuses a multiply with the following add into one FMA,
skipping the intermediate rounding HF does (seen on H100 with triton 3.6: rotary matched torch on
84% of elements with fusion, 100% without). They are memory-bound, so this costs nothing.

- rms_norm_triton ~ RMSNorm: residual add rounded to the input dtype (torch adds two bf16 tensors
  into a bf16 tensor), then variance, rsqrt and scaling in fp32, the normalised x cast back to the
  input dtype, then multiplied by the weight (HF order: `weight * x.to(dtype)`), rounded to the
  promoted dtype of weight and x. Differences: the fp32 sum of squares is reduced in another order,
  and tl.rsqrt on the GPU is the hardware approximation (torch's CUDA rsqrt is too); these change
  fp32 results by ~1 ulp and can flip the rounding of a bf16 output by 1 ulp.
- silu_and_mul_triton ~ silu_and_mul: silu(gate) in fp32 rounded to the input dtype (torch's silu
  on a bf16 tensor returns bf16), then the product with `up` in fp32 rounded again. exp may differ
  from torch's by ~1 ulp.
- rotary_triton ~ RotaryEmbedding.forward (HF math in the input dtype): cos/sin rounded to the
  input dtype, `x * cos` and `rotate_half(x) * sin` each rounded, then their sum rounded: exact
  emulation for 16-bit and fp32 inputs alike.
Under TRITON_INTERPRET=1 (CPU tests) the interpreter's fp32 -> bf16 casts truncate instead of
rounding to nearest even, so there bf16 results differ from torch's by up to 1 ulp; fp16 and fp32
are unaffected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels import check_launchable


# ---------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_inner, stride_xo, stride_xi, stride_ro, stride_ri,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # Row `row` of the [n_outer, n_inner, hidden] view of x (a 2-D x has n_inner == 1).
    row = tl.program_id(0).to(tl.int64)
    i = row // n_inner
    j = row % n_inner
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + i * stride_xo + j * stride_xi + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + i * stride_ro + j * stride_ri + offs, mask=mask, other=0.0).to(tl.float32)
        x_sum = (x + r).to(x_ptr.dtype.element_ty)  # x + residual, rounded as torch does
        tl.store(res_out_ptr + row * hidden + offs, x_sum, mask=mask)
        x = x_sum.to(tl.float32)
    var = tl.sum(x * x, 0) / hidden
    xn = x * tl.rsqrt(var + eps)
    xn = xn.to(x_ptr.dtype.element_ty).to(tl.float32)  # x.to(dtype), as HF, before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, (w * xn).to(out_ptr.dtype.element_ty), mask=mask)


def _rows_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, n_inner, outer stride, inner stride) describing t's rows without copying when possible."""
    assert t.stride(-1) == 1 or t.shape[-1] == 1, "the last dimension must be contiguous"
    if t.dim() == 1:
        return t, 1, 0, 0
    if t.dim() == 2:
        return t, 1, t.stride(0), 0
    if t.dim() == 3:
        return t, t.shape[1], t.stride(0), t.stride(1)
    t2 = t.reshape(-1, t.shape[-1])  # copies only when the leading dims cannot be flattened
    return t2, 1, t2.stride(0), 0


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dimension of x ([..., H]; may be a strided 3-D view such as [T, heads, D]).

    Without residual returns out; with residual returns (norm(x + residual), x + residual), like
    `RMSNorm.forward`. Outputs are new contiguous tensors of x's shape; out's dtype is
    promote(weight, x) as in the reference, the new residual's is x's.
    """
    hidden = x.shape[-1]
    assert weight.shape == (hidden,), (weight.shape, hidden)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    n_rows = x.numel() // hidden if hidden else 0
    if n_rows == 0:
        return out if residual is None else (out, res_out)
    check_launchable(x, weight)
    xv, n_inner, sxo, sxi = _rows_view(x)
    if residual is not None:
        rv, _, sro, sri = _rows_view(residual)  # same shape as x, so the same row structure
    else:
        rv, sro, sri = xv, 0, 0
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(n_rows,)](
        xv, rv, weight, out, res_out if res_out is not None else xv,
        n_inner, sxo, sxi, sro, sri, hidden, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False,
    )
    return out if residual is None else (out, res_out)


# ---------------------------------------------------------------------------------- SiLU and mul


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu -> input dtype
    tl.store(out_ptr + row * inter + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on the last dim; returns a new [..., I] tensor."""
    two_inter = gate_up.shape[-1]
    assert two_inter % 2 == 0, "the last dimension must hold gate and up"
    inter = two_inter // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    x = gate_up.reshape(-1, two_inter)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows = x.shape[0]
    if n_rows == 0 or inter == 0:
        return out
    check_launchable(x)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(n_rows, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------------------------- Rotary


@triton.jit
def _rope_rotate(x_ptr, o_ptr, t, n_heads, stride_xt, stride_xh, stride_ot, stride_oh,
                 c1, c2, s1, s2, nw_ptr, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)
    src = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    if NORM:  # per-head RMSNorm first (Qwen3's q/k norms), rounded as rms_norm_triton does
        r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        dmask = offs_d < HALF
        w1 = tl.load(nw_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        w2 = tl.load(nw_ptr + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
        x1 = (w1[None, :] * (x1 * r[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2[None, :] * (x2 * r[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    # HF: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], each op rounded to dt.
    o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    dst = o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
    n_q_heads, n_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cos, stride_sin,
    v_ptr, slot_ptr, stride_vt, stride_vh, stride_ckv, stride_cslot, qn_ptr, kn_ptr, eps,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    WRITE_KV: tl.constexpr, QK_NORM: tl.constexpr,
):
    # WRITE_KV: k_out_ptr is the KV cache (stride_koh its head stride); rotated k and v go to the
    # token's slot, nothing for slot -1 (q is still rotated: padding rows are never read).
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    dt = q_out_ptr.dtype.element_ty
    # cos/sin tables are fp32; HF casts them to the activation dtype first.
    c1 = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + offs_d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    _rope_rotate(q_ptr, q_out_ptr, t, n_q_heads, stride_qt, stride_qh, stride_qot, stride_qoh,
                 c1, c2, s1, s2, qn_ptr, eps, HALF, BLOCK_HQ, BLOCK_HALF, QK_NORM)
    if WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            dst = k_out_ptr + slot * stride_cslot  # the token's K row in the cache (t's stride: 0)
            _rope_rotate(k_ptr, dst, t, n_k_heads, stride_kt, stride_kh, 0, stride_koh,
                         c1, c2, s1, s2, kn_ptr, eps, HALF, BLOCK_HK, BLOCK_HALF, QK_NORM)
            offs_h = tl.arange(0, BLOCK_HK)
            offs = tl.arange(0, 2 * BLOCK_HALF)
            mask = (offs_h[:, None] < n_k_heads) & (offs[None, :] < 2 * HALF)
            v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs[None, :], mask=mask)
            tl.store(dst + stride_ckv + offs_h[:, None] * stride_koh + offs[None, :],
                     v.to(tl.float32).to(k_out_ptr.dtype.element_ty), mask=mask)
    else:
        _rope_rotate(k_ptr, k_out_ptr, t, n_k_heads, stride_kt, stride_kh, stride_kot, stride_koh,
                     c1, c2, s1, s2, kn_ptr, eps, HALF, BLOCK_HK, BLOCK_HALF, QK_NORM)


def rotary_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                  sin_cache: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX/HF rotary embedding of q [T, Hq, D] and k [T, Hkv, D] at `positions` [T].

    cos_cache/sin_cache: [max_positions, D] tables as RotaryEmbedding's cos_cached/sin_cached
    (usually fp32). Returns (q_rot, k_rot): new contiguous tensors, or q and k themselves rotated in
    place when `inplace` (q/k may be strided views, e.g. of the fused qkv output).
    """
    num_tokens, n_q_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0, (q.shape, k.shape)
    assert q.dtype == k.dtype, (q.dtype, k.dtype)
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "head dim must be contiguous"
    assert cos_cache.shape[-1] == head_dim and sin_cache.shape[-1] == head_dim
    assert cos_cache.stride(-1) == 1 and sin_cache.stride(-1) == 1
    n_k_heads = k.shape[1]
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    check_launchable(positions, q, k, cos_cache, sin_cache)
    _launch_rotary(positions, q, k, q_out, k_out, cos_cache, sin_cache, (k_out.stride(0), k_out.stride(1)))
    return q_out, k_out


def rotary_write_kv_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cos_cache: torch.Tensor, sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                           k_norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """`rotary_triton` then `write_kv_triton` in one launch: returns the rotated q (a new tensor)
    and stores the rotated k and v at `slot_mapping` in kv_cache [2, blocks, block_size, Hkv, D]
    (slot -1 = skip); the rotated k is never materialised elsewhere. With q/k norm weights ([D]
    each), q and k are first RMS-normalised per head (Qwen3), as `RMSNorm` would."""
    assert (q_norm_weight is None) == (k_norm_weight is None), "q and k norms come together"
    num_tokens, _, head_dim = q.shape
    two, _, block_size, num_kv_heads, kv_head_dim = kv_cache.shape
    assert two == 2 and kv_head_dim == head_dim and k.shape == v.shape == (num_tokens, num_kv_heads, head_dim)
    assert v.stride(-1) == 1 and slot_mapping.shape == (num_tokens,)
    assert kv_cache.stride(1) == block_size * kv_cache.stride(2) and kv_cache.stride(4) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    check_launchable(positions, q, k, v, cos_cache, sin_cache, kv_cache, slot_mapping)
    norms = None if q_norm_weight is None else (q_norm_weight, k_norm_weight, float(eps))
    _launch_rotary(positions, q, k, q_out, kv_cache, cos_cache, sin_cache, (0, kv_cache.stride(3)),
                   kv=(v, slot_mapping, v.stride(0), v.stride(1), kv_cache.stride(0), kv_cache.stride(2)),
                   norms=norms)
    return q_out


def _launch_rotary(positions, q, k, q_out, k_out, cos_cache, sin_cache, k_out_strides, kv=None,
                   norms=None) -> None:
    num_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    half = head_dim // 2
    if kv is None:
        kv = (q, positions, 0, 0, 0, 0)  # unused
    qk_norm = norms is not None
    if norms is None:
        norms = (q, q, 0.0)  # unused
    _rotary_kernel[(num_tokens,)](
        positions, q, k, q_out, k_out, cos_cache, sin_cache,
        n_q_heads, n_k_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), *k_out_strides,
        cos_cache.stride(0), sin_cache.stride(0), *kv, *norms,
        HALF=half, BLOCK_HQ=triton.next_power_of_2(n_q_heads), BLOCK_HK=triton.next_power_of_2(n_k_heads),
        BLOCK_HALF=triton.next_power_of_2(half), WRITE_KV=k_out.dim() == 5, QK_NORM=qk_norm,
        num_warps=4 if n_q_heads * half >= 1024 else 1, enable_fp_fusion=False,
    )
