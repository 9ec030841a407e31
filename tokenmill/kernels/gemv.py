"""Fused small-batch projections (GEMV) for decode: each launch does a linear layer and the
elementwise work around it, so a decoder layer is 5 kernels instead of ~13 at batch 1.

At batch 1 the step is a stream of weight bytes; the separate RMSNorm, RoPE, KV write, SiLU and
residual-add kernels around cuBLAS's GEMVs cost ~2 us each plus ~1 us of launch gap inside the
CUDA graph (H200 profile: 0.88 ms of small kernels and 0.43 ms of gaps in a 4.8 ms step). Here:

  gemv_norm_rope_kv  x -> RMSNorm -> qkv projection (+bias) -> RoPE on q and k -> k, v into the
                     paged cache, q out. One program = HB rows of each half of one head, so the
                     rotate-half pairs (d, d + D/2) meet in one program's registers.
  gemv_linear        out = x @ W^T (+bias), then + residual: o_proj and down_proj, each returning
                     the residual stream the next norm reads (optionally with the RMSNorm prologue and
                     without the residual: the qkv projection of models with q/k norms).
  gemv_norm_silu     x -> RMSNorm -> gate/up projection -> silu(gate) * up. One program = HB rows
                     of gate and the same HB rows of up.

Every program computes the norm's sum of squares of the whole row itself: the row is a few KB
read from L2, against the program's tens of KB of weights.

Numerics: the projection's output is rounded to the activation dtype before RoPE / SiLU / the
residual add, each of those rounded as fused_ops does, as on the unfused path (the torch
reference in tokenmill.layers); the projection's fp32 summation order differs from cuBLAS's. On
the tl.dot path the norm rounds as the reference does (x.to(dtype), then the weight product). The
one-row path computes (x * norm weight) @ W^T / rms(x) in fp32, without rounding the normalised
x to the activation dtype first: one rounding fewer (closer to exact), and the 1/rms comes from
the main loop instead of a pass over x before it (H200: qkv 16.1 -> 15.7 us, gate/up 56.4 ->
55.6 us).

Inputs: 2-D [M, K] activations with a contiguous last dim, weights [N, K] contiguous. M is small
(the kernels load each weight tile once for all M rows): one row runs a broadcast-multiply-sum
loop on the CUDA cores, 2-64 rows tl.dot on 16, 32 or 64 padded rows (see GEMV_CONFIGS for why
the two and what they cost).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokenmill.kernels import check_launchable, kernels_interpreted
from tokenmill.kernels.pdl import launch_next, pdl_launch_args, wait_for_inputs

# Largest batch the kernels take (tl.dot on 16, 32 or 64 padded rows), and the largest the model
# sends them (`DecoderModel.takes_fused_path`): one row, where the H200 sweep has the fused layer
# ahead of cuBLAS (benchmarks/gemv_bench.py times 1-64 rows both ways; see GEMV_CONFIGS).
MAX_FUSED_ROWS = 64
ENGINE_FUSED_ROWS = 1


@triton.jit
def _inv_rms(x_ptr, stride_xm, offs_m, m_mask, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M] fp32 1/rms of each row of x: the tl.dot path's RMSNorm prologue."""
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        ss += tl.sum(xk * xk, 1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _x_chunk(x_ptr, stride_xm, offs_m, m_mask, offs_k, K, inv_rms, nw_ptr, NORM: tl.constexpr):
    """[BLOCK_M, BLOCK_K] activations in fp32, normalised as RMSNorm rounds them when NORM."""
    k_mask = offs_k < K
    xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                 mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    dt = xk.dtype
    xk = xk.to(tl.float32)
    if NORM:
        xn = (xk * inv_rms[:, None]).to(dt).to(tl.float32)  # x.to(dtype), as HF, before the weight
        nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        xk = (nw[None, :] * xn).to(dt).to(tl.float32)
    return xk


@triton.jit
def _raw_x_chunk(x_ptr, stride_xm, offs_m, m_mask, offs_k, K, nw_ptr, NORM: tl.constexpr):
    """([BLOCK_M, BLOCK_K] x * norm weight (x alone without NORM), x * x), fp32: the one-row
    path's RMSNorm, whose 1/rms scales the projection's sums after the loop."""
    k_mask = offs_k < K
    xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                 mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    sq = xk * xk
    if NORM:
        xk = xk * tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return xk, sq


@triton.jit
def _fold(prod, HB: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr):
    """[HB, BLOCK_K] -> [HB, BLOCK_K // FOLD]: sums of FOLD neighbouring products. Each thread
    holds 8 neighbours (one 16-byte load), so the sums stay within threads (no shuffles in the
    loop's PTX) and the accumulator shrinks FOLD times: registers for more programs per SM."""
    if FOLD == 1:
        return prod
    return tl.sum(tl.reshape(prod, [HB, BLOCK_K // FOLD, FOLD]), 2)


@triton.jit
def _dot_acc(acc, xk, w, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BN] += xk [BLOCK_M, BK] @ w[BN, BK]^T on the tensor cores (BLOCK_M >= 16)."""
    if UPCAST:
        return tl.dot(xk, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(xk.to(w.dtype), tl.trans(w), acc, input_precision=DOT_PRECISION)


@triton.jit
def _weight_tiles(wa, wb, mask_a, mask_b, offs_k, K):
    """The K chunk offs_k of both row sets (row pointers wa, wb)."""
    k_mask = offs_k < K
    w_a = tl.load(wa + offs_k[None, :], mask=mask_a[:, None] & k_mask[None, :], other=0.0)
    w_b = tl.load(wb + offs_k[None, :], mask=mask_b[:, None] & k_mask[None, :], other=0.0)
    return w_a, w_b


@triton.jit
def _two_row_sets(x_ptr, stride_xm, M, K, w_ptr, stride_wn, rows_a, rows_b, mask_a, mask_b,
                  nw_ptr, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr, HB: tl.constexpr,
                  BLOCK_K: tl.constexpr, FOLD: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """x (normalised when NORM) times two sets of HB weight rows: ([BLOCK_M, HB], [BLOCK_M, HB]).

    One row (BLOCK_M == 1): products accumulate elementwise in [HB, BLOCK_K // FOLD] fp32
    registers and are reduced across threads once, after the loop (a reduction per K chunk would
    put warp shuffles between the weight loads). The first K chunk of weights is loaded before
    waiting for the previous kernel (PDL): its latency overlaps that kernel's tail. The norm's
    sum of squares accumulates in the same loop from the x chunks it loads anyway, and its 1/rms
    scales the sums at the end: no prologue pass over x before the weights stream. More rows:
    tl.dot on 16 padded rows, after a prologue pass for 1/rms."""
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    wa = w_ptr + rows_a.to(tl.int64)[:, None] * stride_wn
    wb = w_ptr + rows_b.to(tl.int64)[:, None] * stride_wn
    if BLOCK_M == 1:
        offs_k = tl.arange(0, BLOCK_K)
        w_a, w_b = _weight_tiles(wa, wb, mask_a, mask_b, offs_k, K)
        wait_for_inputs(PDL)
        # The one row is read as an [HB, BLOCK_K] tile (every row of it row 0, served by L1) so
        # that it comes in the weight tile's register layout: a [1, BLOCK_K] load would be
        # converted through shared memory, with barriers, in every iteration.
        row0 = tl.zeros([HB], tl.int32)
        all_rows = row0 == 0
        xk, sq = _raw_x_chunk(x_ptr, stride_xm, row0, all_rows, offs_k, K, nw_ptr, NORM)
        part_a = _fold(w_a.to(tl.float32) * xk, HB, BLOCK_K, FOLD)
        part_b = _fold(w_b.to(tl.float32) * xk, HB, BLOCK_K, FOLD)
        part_sq = _fold(sq, HB, BLOCK_K, FOLD)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w_a, w_b = _weight_tiles(wa, wb, mask_a, mask_b, offs_k, K)
            xk, sq = _raw_x_chunk(x_ptr, stride_xm, row0, all_rows, offs_k, K, nw_ptr, NORM)
            part_a += _fold(w_a.to(tl.float32) * xk, HB, BLOCK_K, FOLD)
            part_b += _fold(w_b.to(tl.float32) * xk, HB, BLOCK_K, FOLD)
            if NORM:
                part_sq += _fold(sq, HB, BLOCK_K, FOLD)
        launch_next(PDL)
        acc_a = tl.sum(part_a, 1)
        acc_b = tl.sum(part_b, 1)
        if NORM:  # [HB] copies of the row's 1/rms: RMSNorm(x) @ W^T = (x * w_norm) @ W^T / rms(x)
            inv = tl.rsqrt(tl.sum(part_sq, 1) / K + eps)
            acc_a = acc_a * inv
            acc_b = acc_b * inv
        acc_a = acc_a[None, :]
        acc_b = acc_b[None, :]
    else:
        wait_for_inputs(PDL)
        inv_rms = tl.zeros([BLOCK_M], tl.float32)
        if NORM:
            inv_rms = _inv_rms(x_ptr, stride_xm, offs_m, m_mask, K, eps, BLOCK_M, BLOCK_K)
        acc_a = tl.zeros([BLOCK_M, HB], tl.float32)
        acc_b = tl.zeros([BLOCK_M, HB], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w_a, w_b = _weight_tiles(wa, wb, mask_a, mask_b, offs_k, K)
            xk = _x_chunk(x_ptr, stride_xm, offs_m, m_mask, offs_k, K, inv_rms, nw_ptr, NORM)
            acc_a = _dot_acc(acc_a, xk, w_a, UPCAST, DOT_PRECISION)
            acc_b = _dot_acc(acc_b, xk, w_b, UPCAST, DOT_PRECISION)
        launch_next(PDL)
    return acc_a, acc_b


@triton.jit
def _norm_rope_kv_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr, slot_ptr,
    M, K, eps, stride_xm, stride_wn, stride_qt, stride_qh, stride_cos, stride_sin,
    stride_ckv, stride_cslot, stride_ch,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, HB: tl.constexpr, BLOCK_K: tl.constexpr,
    FOLD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    CHUNKS: tl.constexpr = HALF // HB
    pid = tl.program_id(0)
    head = pid // CHUNKS
    d = (pid % CHUNKS) * HB + tl.arange(0, HB)  # this program's dims in the first half
    rows_a = head * HEAD_DIM + d
    rows_b = rows_a + HALF
    ones = d >= 0
    acc_a, acc_b = _two_row_sets(x_ptr, stride_xm, M, K, w_ptr, stride_wn, rows_a, rows_b, ones, ones,
                                 nw_ptr, eps, True, BLOCK_M, HB, BLOCK_K, FOLD, UPCAST, DOT_PRECISION, PDL)
    dt = q_ptr.dtype.element_ty
    if HAS_BIAS:
        acc_a += tl.load(b_ptr + rows_a).to(tl.float32)[None, :]
        acc_b += tl.load(b_ptr + rows_b).to(tl.float32)[None, :]
    x1 = acc_a.to(dt).to(tl.float32)  # the projection's bf16 output
    x2 = acc_b.to(dt).to(tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if head < NUM_Q_HEADS + NUM_KV_HEADS:  # q and k heads: RoPE, rounded as rotary_triton does
        pos = tl.load(pos_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        c1 = tl.load(cos_ptr + pos[:, None] * stride_cos + d[None, :]).to(dt).to(tl.float32)
        c2 = tl.load(cos_ptr + pos[:, None] * stride_cos + HALF + d[None, :]).to(dt).to(tl.float32)
        s1 = tl.load(sin_ptr + pos[:, None] * stride_sin + d[None, :]).to(dt).to(tl.float32)
        s2 = tl.load(sin_ptr + pos[:, None] * stride_sin + HALF + d[None, :]).to(dt).to(tl.float32)
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    else:  # v heads
        o1 = x1.to(dt)
        o2 = x2.to(dt)
    mask = m_mask[:, None] & ones[None, :]
    if head < NUM_Q_HEADS:
        dst = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :]
        tl.store(dst, o1, mask=mask)
        tl.store(dst + HALF, o2, mask=mask)
    else:
        # k heads, then v heads: arithmetic, not a branch reassigning scalars (the compiler wants
        # one type per variable across both sides of a runtime `if`).
        kv = head - NUM_Q_HEADS
        is_v = (kv >= NUM_KV_HEADS).to(tl.int32)
        kv_head = kv - is_v * NUM_KV_HEADS
        slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
        keep = mask & (slot[:, None] >= 0)  # slot -1: a padding row of a CUDA-graph batch
        ct = cache_ptr.dtype.element_ty
        dst = (cache_ptr + is_v.to(tl.int64) * stride_ckv + slot[:, None] * stride_cslot
               + kv_head.to(tl.int64) * stride_ch + d[None, :])
        tl.store(dst, o1.to(ct), mask=keep)
        tl.store(dst + HALF, o2.to(ct), mask=keep)


@triton.jit
def _linear_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, res_ptr, out_ptr, M, N, K, eps, stride_xm, stride_wn, stride_rm, stride_om,
    NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, HB: tl.constexpr, BLOCK_K: tl.constexpr,
    FOLD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    # Two sets of HB consecutive rows: rows [2*HB*pid, 2*HB*pid + 2*HB).
    rows_a = tl.program_id(0) * 2 * HB + tl.arange(0, HB)
    rows_b = rows_a + HB
    mask_a = rows_a < N
    mask_b = rows_b < N
    acc_a, acc_b = _two_row_sets(x_ptr, stride_xm, M, K, w_ptr, stride_wn, rows_a, rows_b, mask_a, mask_b,
                                 nw_ptr, eps, NORM, BLOCK_M, HB, BLOCK_K, FOLD, UPCAST, DOT_PRECISION, PDL)
    if HAS_BIAS:
        acc_a += tl.load(b_ptr + rows_a, mask=mask_a, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(b_ptr + rows_b, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    _store_rows(acc_a, rows_a, mask_a, M, res_ptr, out_ptr, stride_rm, stride_om, HAS_RESIDUAL, BLOCK_M)
    _store_rows(acc_b, rows_b, mask_b, M, res_ptr, out_ptr, stride_rm, stride_om, HAS_RESIDUAL, BLOCK_M)


@triton.jit
def _store_rows(acc, rows, row_mask, M, res_ptr, out_ptr, stride_rm, stride_om, HAS_RESIDUAL: tl.constexpr,
                BLOCK_M: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & row_mask[None, :]
    dt = out_ptr.dtype.element_ty
    y = acc.to(dt)  # the projection's output, rounded as torch's linear returns it
    if HAS_RESIDUAL:  # then `x + residual` in the activation dtype
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + rows[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(dt)
    tl.store(out_ptr + offs_m[:, None] * stride_om + rows[None, :], y, mask=mask)


@triton.jit
def _norm_silu_kernel(
    x_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, M, INTER, K, eps, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, HB: tl.constexpr, BLOCK_K: tl.constexpr,
    FOLD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    cols = tl.program_id(0) * HB + tl.arange(0, HB)  # output columns = gate rows; up rows + INTER
    mask_c = cols < INTER
    acc_g, acc_u = _two_row_sets(x_ptr, stride_xm, M, K, w_ptr, stride_wn, cols, cols + INTER, mask_c, mask_c,
                                 nw_ptr, eps, True, BLOCK_M, HB, BLOCK_K, FOLD, UPCAST, DOT_PRECISION, PDL)
    dt = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + INTER + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # F.silu in the activation dtype
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], (s * u).to(dt), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side

# Launch settings per kernel. One row (unless `mma`) takes the broadcast path: hb rows per row
# set, block_k, fold, num_warps, num_stages. More rows (or `mma`) take the tl.dot path: dot_hb
# (>= 16, tl.dot's smallest N), dot_block_k, dot_num_warps, dot_num_stages. `pdl`: launch as a
# programmatic dependent of the previous kernel (sm_90+; on the one-row path the first weight
# chunk loads before the wait). From the compiled code (sm_90, triton 3.9 and 3.6,
# benchmarks/compile_check.py, the PTX):
# - the broadcast loop is the weight and x loads (16 bytes each per thread) and the products,
#   nothing else (no shared memory, no barriers, no shuffles), but it is not software-pipelined;
#   `fold` sums each thread's products 8 to 1 before accumulating (at hb 4 x 1024 that took the
#   projection from 128 to 56-72 registers; the swept hb 2 x 1024 compiles to 39-56);
# - tl.dot streams the weights through shared memory with cp.async, num_stages - 1 chunks ahead;
#   16-row norm kernels reach the 255-register cap at dot_block_k 512 (dot_block_k 256 for them;
#   `linear` at 512 is at exactly 255 with the q/k-norm prologue: matters only if ENGINE_FUSED_ROWS
#   is raised).
# Values: the fastest of `benchmarks/gemv_bench.py --sweep` on an H200 (2026-12-01, 8B shape,
# docs/performance.md): one row 3.1-4.2 TB/s against cuBLAS's 2.1-3.7 (+ its separate norm, RoPE,
# SiLU, residual kernels); PDL won on every kind. At 2-64 rows the tl.dot path lost to cuBLAS on
# qkv and gate_up (1.3-2.1 TB/s), so the engine sends only one-row steps here (ENGINE_FUSED_ROWS).
_DOT = dict(dot_hb=16, dot_block_k=256, dot_num_warps=4, dot_num_stages=3)
GEMV_CONFIGS = {
    "norm_rope_kv": dict(hb=4, block_k=512, fold=8, num_warps=8, num_stages=1, mma=False, pdl=True,
                         **dict(_DOT, dot_num_stages=4)),
    "linear": dict(hb=2, block_k=1024, fold=8, num_warps=4, num_stages=1, mma=False, pdl=True,
                   **dict(_DOT, dot_block_k=512, dot_num_stages=4)),
    "norm_silu": dict(hb=2, block_k=1024, fold=8, num_warps=4, num_stages=1, mma=False, pdl=True, **_DOT),
}

TUNED_CONFIGS_ENV = "TOKENMILL_GEMV_CONFIGS"


def load_tuned_configs(path: str) -> None:
    """Update GEMV_CONFIGS (and ENGINE_FUSED_ROWS) from a JSON file as `gemv_bench.py --sweep`
    writes it: {"configs": {kind: {key: value}}, "engine_fused_rows": n}. Read at import from the
    file TOKENMILL_GEMV_CONFIGS names (the way vLLM reads tuned fused-MoE configs), so a tuned
    device runs with its own figures without a code change. The whole file is checked before
    anything is applied: unknown kernels or keys, wrong types, tile sizes that are not powers of two
    and a row limit out of range are errors naming the file and the value."""
    global ENGINE_FUSED_ROWS
    import json

    with open(path) as f:
        tuned = json.load(f)
    configs = tuned.get("configs", {})
    for kind, overrides in configs.items():
        if kind not in GEMV_CONFIGS:
            raise ValueError(f"{path}: unknown GEMV kernel {kind!r} (known: {', '.join(GEMV_CONFIGS)})")
        unknown = set(overrides) - set(GEMV_CONFIGS[kind])
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} for {kind!r} (known: {sorted(GEMV_CONFIGS[kind])})")
        for key, value in overrides.items():
            if key in ("mma", "pdl"):
                if not isinstance(value, bool):
                    raise ValueError(f"{path}: {kind}.{key} must be true or false, got {value!r}")
                continue
            stages = key.endswith("num_stages")  # any count; tile sizes, fold and warps: powers of two
            if (isinstance(value, bool) or not isinstance(value, int) or value < 1
                    or (not stages and value & (value - 1))):
                want = "a positive integer" + ("" if stages else ", a power of two")
                raise ValueError(f"{path}: {kind}.{key} must be {want}, got {value!r}")
    rows = tuned.get("engine_fused_rows", ENGINE_FUSED_ROWS)
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= MAX_FUSED_ROWS:
        raise ValueError(f"{path}: engine_fused_rows must be an integer in [0, {MAX_FUSED_ROWS}], got {rows!r}")
    for kind, overrides in configs.items():
        GEMV_CONFIGS[kind].update(overrides)
    ENGINE_FUSED_ROWS = rows


if os.environ.get(TUNED_CONFIGS_ENV):
    try:
        load_tuned_configs(os.environ[TUNED_CONFIGS_ENV])
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{TUNED_CONFIGS_ENV}={os.environ[TUNED_CONFIGS_ENV]}: {e}") from e


def _config(kind: str, m: int, config: dict | None) -> tuple[dict, bool]:
    """(hb, block_k, num_warps, num_stages, fold, pdl of the path a launch of `kind` over m rows
    takes, whether it is the tl.dot path)."""
    cfg = dict(GEMV_CONFIGS[kind], **(config or {}))
    dot = m > 1 or cfg["mma"]
    keys = ("hb", "block_k", "num_warps", "num_stages")
    chosen = {k: cfg[f"dot_{k}"] if dot else cfg[k] for k in keys}
    chosen["fold"] = 1 if dot else cfg["fold"]
    chosen["pdl"] = cfg["pdl"]
    if dot:
        chosen["hb"] = max(chosen["hb"], 16)
    return chosen, dot


def _rope_row_set(m: int, head_dim: int, config: dict | None) -> int | None:
    """HB for gemv_norm_rope_kv at m rows: each half head must split into whole row sets (of >= 16
    rows on the tl.dot path); None where `head_dim` cannot."""
    cfg, dot = _config("norm_rope_kv", m, config)
    hb = min(cfg["hb"], head_dim // 2)
    ok = head_dim % 2 == 0 and hb > 0 and (head_dim // 2) % hb == 0 and (not dot or hb >= 16)
    return hb if ok else None


def supports_rope_layout(m: int, head_dim: int) -> bool:
    """Whether gemv_norm_rope_kv can split each half head of `head_dim` into its row sets at m rows."""
    return _rope_row_set(m, head_dim, None) is not None


def _launch_args(kind: str, m: int, weight: torch.Tensor, config: dict | None) -> tuple[dict, int, dict]:
    """(config of the path taken, BLOCK_M, launch kwargs): BLOCK_M is 1 on the broadcast path and
    16, 32 or 64 (rows padded) on the tl.dot path."""
    cfg, dot = _config(kind, m, config)
    block_m = max(16, triton.next_power_of_2(m)) if dot else 1
    if block_m > 16:  # the same x-chunk registers as 16 rows: a shorter K chunk
        cfg["block_k"] = max(64, cfg["block_k"] * 16 // block_m)
    k = weight.shape[1]
    launch = dict(UPCAST=kernels_interpreted(),
                  DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",  # tf32: ignored for 16-bit
                  BLOCK_K=min(cfg["block_k"], triton.next_power_of_2(k)),
                  FOLD=min(cfg["fold"], cfg["block_k"], triton.next_power_of_2(k)),
                  **pdl_launch_args(weight.device, cfg["pdl"]))
    if not kernels_interpreted():
        # No FMA contraction: it would skip the roundings the epilogues copy from torch (see
        # fused_ops: RoPE matched torch on 84% of elements with it on an H100). The loop is
        # memory-bound; separate multiplies and adds cost nothing there.
        launch.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)
    return cfg, block_m, launch


def _check_rows(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, "activations must be [M, K] with a contiguous last dim"
    assert weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] == x.shape[1], (x.shape, weight.shape)
    if x.shape[0] > MAX_FUSED_ROWS:
        raise ValueError(f"fused GEMV kernels take at most {MAX_FUSED_ROWS} rows, got {x.shape[0]}")


def gemv_norm_rope_kv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv_weight: torch.Tensor,
                      qkv_bias: torch.Tensor | None, positions: torch.Tensor, cos_cache: torch.Tensor,
                      sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      num_q_heads: int, *, config: dict | None = None) -> torch.Tensor:
    """q = RoPE(RMSNorm(x) @ Wq^T), with k and v (k rotated) stored at `slot_mapping` in kv_cache.

    x [M, K] (the residual stream), qkv_weight [(Hq + 2 Hkv) * D, K] laid out [q | k | v] as
    `Attention.qkv_proj`, kv_cache [2, blocks, block_size, Hkv, D], slot -1 = skip. Returns q
    [M, Hq, D]. Equals RMSNorm -> qkv_proj -> RotaryEmbedding -> write_kv of the unfused path.
    """
    _check_rows(x, qkv_weight)
    m, k = x.shape
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    assert qkv_weight.shape[0] == (num_q_heads + 2 * num_kv_heads) * head_dim, (qkv_weight.shape, kv_cache.shape)
    assert kv_cache.stride(1) == block_size * kv_cache.stride(2) and kv_cache.stride(4) == 1
    assert cos_cache.stride(-1) == 1 and sin_cache.stride(-1) == 1
    cfg, block_m, launch = _launch_args("norm_rope_kv", m, qkv_weight, config)
    hb = _rope_row_set(m, head_dim, config)
    if hb is None:
        raise ValueError(f"head_dim {head_dim}: half heads must split into row sets of {cfg['hb']} "
                         f"at {m} rows (see supports_rope_layout)")
    q = torch.empty((m, num_q_heads, head_dim), dtype=x.dtype, device=x.device)
    if m == 0:
        return q
    check_launchable(x, qkv_weight, positions, kv_cache, slot_mapping)
    grid = ((num_q_heads + 2 * num_kv_heads) * (head_dim // 2 // hb),)
    _norm_rope_kv_kernel[grid](
        x, norm_weight, qkv_weight, qkv_bias if qkv_bias is not None else qkv_weight, positions,
        cos_cache, sin_cache, q, kv_cache, slot_mapping,
        m, k, float(eps), x.stride(0), qkv_weight.stride(0), q.stride(0), q.stride(1),
        cos_cache.stride(0), sin_cache.stride(0), kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HAS_BIAS=qkv_bias is not None,
        BLOCK_M=block_m, HB=hb,
        **launch)
    return q


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """[M, N] = (RMSNorm(x) if norm_weight is given else x) @ weight^T + bias, rounded to x's dtype,
    then + residual when given (o_proj / down_proj returning the new residual stream)."""
    _check_rows(x, weight)
    m, k = x.shape
    n = weight.shape[0]
    if residual is not None:
        assert residual.shape == (m, n) and residual.stride(-1) == 1, (residual.shape, (m, n))
    cfg, block_m, launch = _launch_args("linear", m, weight, config)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    check_launchable(x, weight)
    hb = cfg["hb"]
    _linear_kernel[(triton.cdiv(n, 2 * hb),)](
        x, norm_weight if norm_weight is not None else x, weight, bias if bias is not None else weight,
        residual if residual is not None else out, out, m, n, k, float(eps),
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        NORM=norm_weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m, HB=hb, **launch)
    return out


def gemv_norm_silu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
                   bias: torch.Tensor | None, *, config: dict | None = None) -> torch.Tensor:
    """silu(gate) * up of RMSNorm(x) @ gate_up_weight^T ([gate | up] rows, as MLP.gate_up_proj): [M, I]."""
    _check_rows(x, gate_up_weight)
    m, k = x.shape
    inter = gate_up_weight.shape[0] // 2
    assert gate_up_weight.shape[0] == 2 * inter
    cfg, block_m, launch = _launch_args("norm_silu", m, gate_up_weight, config)
    out = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    check_launchable(x, gate_up_weight)
    hb = cfg["hb"]
    _norm_silu_kernel[(triton.cdiv(inter, hb),)](
        x, norm_weight, gate_up_weight, bias if bias is not None else gate_up_weight, out, m, inter, k, float(eps),
        x.stride(0), gate_up_weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, HB=hb,
        **launch)
    return out
