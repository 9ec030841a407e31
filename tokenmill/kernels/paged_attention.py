"""Paged attention in Triton: a prefill/mixed kernel and a split-K decode kernel.

Same semantics as `tokenmill.layers.attention.paged_attention_torch`: q [T, Hq, D] is the flat batch
of all scheduled requests, decodes first (`meta.num_decodes` requests of query_len 1), then
prefill chunks; query i of request r sits at absolute position seq_len - q_len + i and attends to
keys 0..that position, read from the paged cache [2, num_blocks, block_size, Hkv, D] through the
request's block table. K/V are never copied or repeated: query head h uses kv head h // (Hq/Hkv).

Prefill kernel (`_prefill_kernel`), grid (query tiles, Hkv):
  one program = BLOCK_Q query tokens x all GROUP = Hq/Hkv query heads of one kv head, laid out as
  BLOCK_M = BLOCK_Q * GROUP rows (row = token * GROUP + head-in-group), so each K/V tile is loaded
  once for the whole group. Flash-attention online softmax (fp32, exp2) over BLOCK_N-key tiles
  gathered through the block table: first the keys every query of the tile sees (no mask), then the
  diagonal part (causal mask). Tile -> request mapping is found on the device: request j's first
  tile is (query_start_loc[j] - query_start_loc[first]) // BLOCK_Q + j, which is monotone in j, so a
  binary search over query_start_loc gives each program its request. The grid is the upper bound
  T_prefill // BLOCK_Q + num_prefills; programs past the end of their request return at once. No
  host sync, no per-step tile table, and the grid depends only on (T, R): CUDA-graph friendly.

Decode kernel (`_decode_kernel` + `_decode_reduce_kernel`), grid (num_decodes, Hkv, partitions):
  flash-decoding. Each program takes one request, one kv head with its GROUP query heads (padded
  to 16 rows for tl.dot) and one partition of the context; with one partition it writes the output
  directly, otherwise it writes a partial output normalised by its own sum plus its log-sum-exp,
  and the reduce kernel (grid (num_decodes, Hq)) combines the partitions. The partition count is
  chosen on the host so that num_decodes * Hkv * partitions fills the GPU (`decode_partition_size`;
  batch 1 at 8k context: 8 kv heads x 67 partitions of 128 keys). Under a CUDA graph's grid (sized
  for max_model_len) each request divides its own context over the grid's partitions
  (DECODE_PARTITIONS = "dynamic").

Numerics: fp32 accumulation and softmax for bf16/fp16/fp32 inputs; P is cast to the cache dtype
before the P @ V product (as flash attention does). fp32 inputs use IEEE fp32 dots (no TF32).
Under TRITON_INTERPRET=1 the interpreter has no bf16 arithmetic, so the kernels upcast operands to
fp32 before each dot (UPCAST), still rounding P to the cache dtype first: same values, fp32 math.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tokenmill.kernels import check_launchable, kernels_interpreted
from tokenmill.kernels.pdl import launch_next, pdl_launch_args, wait_for_inputs
from tokenmill.layers.attention import AttentionMetadata

_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every dimension >= 16 on NVIDIA GPUs


@triton.jit
def _attend_tile(acc, l_i, m_i, q, offs_n, key_end, q_pos, bt_row, k_base, v_base, offs_d, d_mask,
                 scale_log2, stride_blk, stride_tok,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys offs_n. MASKED: keys >= key_end are absent, and with
    CAUSAL row i sees keys <= q_pos[i] only (else every present key; q_pos is then unused)."""
    if MASKED:
        n_valid = offs_n < key_end
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    tok_off = blk * stride_blk + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_tok
    if MASKED:
        kt = tl.load(k_base + tok_off[None, :] + offs_d[:, None], mask=n_valid[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_base + tok_off[:, None] + offs_d[None, :], mask=n_valid[:, None] & d_mask[None, :], other=0.0)
    else:
        kt = tl.load(k_base + tok_off[None, :] + offs_d[:, None], mask=d_mask[:, None], other=0.0)
        v = tl.load(v_base + tok_off[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    if UPCAST:
        qk = tl.dot(q, kt.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    qk = qk * scale_log2
    if MASKED:
        if CAUSAL:
            qk = tl.where(offs_n[None, :] <= q_pos[:, None], qk, float("-inf"))
        else:
            qk = tl.where(n_valid[None, :], qk, float("-inf"))
    # m_i starts finite (-1e30), so a row with no key in this tile keeps alpha = 1 and p = 0.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = p.to(v.dtype)
    if UPCAST:
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["first_req", "num_prefills"])
def _prefill_kernel(
    q_ptr, kv_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    scale_log2, first_req, num_prefills,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_blk, stride_tok, stride_kvh, stride_bt,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)

    # Which prefill request does this tile belong to? Largest j with first_tile(j) <= tile, where
    # first_tile(j) = (qsl[first + j] - qsl[first]) // BLOCK_Q + j is non-decreasing in j.
    q_base = tl.load(qsl_ptr + first_req)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_prefills - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        mid_first = (tl.load(qsl_ptr + first_req + mid) - q_base) // BLOCK_Q + mid
        if mid_first <= tile:
            lo = mid
        else:
            hi = mid - 1
    req = first_req + lo
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    qs = (tile - ((q_start - q_base) // BLOCK_Q + lo)) * BLOCK_Q  # first query of the tile, in req
    if qs >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len  # cached prefix: query i is at absolute position ctx_len + i

    rows = tl.arange(0, BLOCK_M)
    tok = qs + rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = ctx_len + tok

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    k_base = kv_ptr + kvh.to(tl.int64) * stride_kvh
    v_base = k_base + stride_kv

    # Keys below ctx_len + qs are seen by every query of the tile: whole tiles of them need no mask.
    key_end = ctx_len + tl.minimum(qs + BLOCK_Q, q_len)
    full_end = ((ctx_len + qs) // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, offs_n, key_end, q_pos, bt_row, k_base, v_base,
                                     offs_d, d_mask, scale_log2, stride_blk, stride_tok,
                                     BLOCK_SIZE, False, True, UPCAST, DOT_PRECISION)
    for start in range(full_end, key_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, offs_n, key_end, q_pos, bt_row, k_base, v_base,
                                     offs_d, d_mask, scale_log2, stride_blk, stride_tok,
                                     BLOCK_SIZE, True, True, UPCAST, DOT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["partition_size"])
def _decode_kernel(
    q_ptr, kv_ptr, out_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr, seq_lens_ptr,
    scale_log2, partition_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_blk, stride_tok, stride_kvh, stride_bt,
    stride_pr, stride_ph, stride_pp,  # partial outputs [nd, Hq, P, D]; lse [nd, Hq, P] uses them / D
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, DYNAMIC: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    req = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    if DYNAMIC:  # this request's own partition size (see _dynamic_partition)
        partition_size = _dynamic_partition(seq_len, tl.num_programs(2), BLOCK_N)
    start = part * partition_size
    if (part > 0) & (start >= seq_len):  # partition 0 always runs: a seq_len 0 (padding) row gets zeros
        return
    end = tl.minimum(start + partition_size, seq_len)

    g = tl.arange(0, BLOCK_G)
    g_valid = g < GROUP
    head = kvh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    req64 = req.to(tl.int64)
    q = tl.load(q_ptr + req64 * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=g_valid[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + req64 * stride_bt
    k_base = kv_ptr + kvh.to(tl.int64) * stride_kvh
    v_base = k_base + stride_kv
    for s in range(start, end, BLOCK_N):
        offs_n = s + tl.arange(0, BLOCK_N)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, offs_n, end, m_i, bt_row, k_base, v_base,
                                     offs_d, d_mask, scale_log2, stride_blk, stride_tok,
                                     BLOCK_SIZE, True, False, UPCAST, DOT_PRECISION)
    launch_next(PDL)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # l_i is 0 only for seq_len 0: the row comes out as zeros
    out = acc / l_i[:, None]
    mask = g_valid[:, None] & d_mask[None, :]
    if SPLIT:
        base = req64 * stride_pr + head.to(tl.int64) * stride_ph + part * stride_pp
        tl.store(part_out_ptr + base[:, None] + offs_d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + base // stride_pp, m_i + tl.log2(l_i), mask=g_valid)
    else:
        tl.store(out_ptr + req64 * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dynamic_partition(seq_len, num_parts, BLOCK_N: tl.constexpr):
    """Keys per partition when each request splits its own context over the grid's `num_parts`
    partitions (whole key tiles, at least one): a CUDA graph's grid is sized for max_model_len, so
    a fixed size leaves a short context on a few long partitions while the rest exit at once."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_parts), BLOCK_N), 1) * BLOCK_N


@triton.jit(do_not_specialize=["partition_size", "grid_parts"])
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, partition_size, grid_parts,
    stride_ot, stride_oh, stride_pr, stride_ph, stride_pp,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DYNAMIC: tl.constexpr, PDL: tl.constexpr,
):
    """out[r, h] = sum_p 2^(lse_p - max) * o_p / sum_p 2^(lse_p - max) over the used partitions."""
    wait_for_inputs(PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req)
    if DYNAMIC:
        partition_size = _dynamic_partition(seq_len, grid_parts, BLOCK_N)
    num_parts = tl.cdiv(seq_len, partition_size)
    base = req.to(tl.int64) * stride_pr + head.to(tl.int64) * stride_ph
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    lse_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + offs_p
        lse = tl.load(part_lse_ptr + (base + p * stride_pp) // stride_pp, mask=p < num_parts,
                      other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    m = tl.max(lse_max, 0)

    acc = tl.zeros([BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        p = p0 + offs_p
        p_valid = p < num_parts
        lse = tl.load(part_lse_ptr + (base + p * stride_pp) // stride_pp, mask=p_valid, other=float("-inf"))
        w = tl.exp2(lse - m)
        o = tl.load(part_out_ptr + base + p[:, None] * stride_pp + offs_d[None, :],
                    mask=p_valid[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        den += w
    launch_next(PDL)
    den_sum = tl.sum(den, 0)
    out = acc / tl.where(den_sum == 0.0, 1.0, den_sum)  # seq_len 0 (padding): zeros
    tl.store(out_ptr + req.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


# ----------------------------------------------------------------------------------------------
# Host side


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter on the CPU: any small number
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def prefill_config(head_dim: int, group: int, elem_bytes: int = 2) -> dict:
    """Tile sizes of the prefill kernel for a head size, GQA group (rows = tokens x group) and
    element size (fp32 tiles are halved to fit shared memory; fp32 dots run without tensor cores)."""
    if elem_bytes >= 4:
        return dict(block_m=max(64, triton.next_power_of_2(group)), block_n=32, num_warps=4, num_stages=2)
    # H100, bf16, D=128, group 4: 64 x 64 tiles with 4 warps beat 128 x 64 with 8 (352 vs 315
    # TFLOP/s at 4 x 2048 with a 1024 prefix), see benchmarks/kernels_bench.py --sweep.
    block_m = max(64, triton.next_power_of_2(group))
    return dict(block_m=block_m, block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)


def decode_config(head_dim: int, group: int, elem_bytes: int = 2) -> dict:
    """Key tile and launch settings of the decode kernel (rows = the group's query heads, >= 16)."""
    return dict(block_n=64 if elem_bytes <= 2 or head_dim <= 64 else 32, num_warps=4, num_stages=2)


def decode_partition_size(num_decodes: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                          block_n: int = 64, min_partition: int = 128, programs_per_sm: int = 8) -> int:
    """Keys per split-K partition: split only when num_decodes * Hkv programs would leave SMs idle;
    then aim for ~`programs_per_sm` programs per SM, with partitions of at least `min_partition` keys
    (a multiple of block_n). Returns a size >= max_seq_len (one partition: no reduce) when no split
    is wanted.

    Defaults measured end to end (benchmarks/partition_sweep.py, H200, 8B shape, batch 1, graphs
    sized for an 8,464-token max_model_len): 128-key partitions (~8 programs per SM) decode 208 tok/s
    at a 128-token prompt and 194 at 8k, against 200 and 192 with the earlier 256 x 2 policy (320-key
    partitions there); 64-key partitions lose at 8k (186): per-partition overhead outweighs the
    extra parallelism."""
    base = num_decodes * num_kv_heads
    one = max(block_n, triton.cdiv(max_seq_len, block_n) * block_n)
    if base >= 2 * num_sms or max_seq_len <= min_partition:
        return one
    parts = min(triton.cdiv(programs_per_sm * num_sms, base), triton.cdiv(max_seq_len, min_partition))
    size = triton.cdiv(triton.cdiv(max_seq_len, parts), block_n) * block_n
    return min(one, max(size, min_partition))


# Decode partitions under a graph-sized grid: "fixed" = one size for all requests, from the grid's
# bound (decode_partition_size, measured); "dynamic" = each request divides its own context over the
# grid's partitions (_dynamic_partition): the same size at a long context, finer at a short one.
# H200, 8B batch 1 (engine_bench --decode-partitions, one machine): prompt 128 243.5 vs 241.0 tok/s,
# 8k and throughput unchanged, so "dynamic".
DECODE_PARTITIONS = "dynamic"


def paged_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                           *, out: torch.Tensor | None = None, partition_size: int | None = None,
                           max_decode_seq_len: int | None = None, block_m: int | None = None,
                           block_n: int | None = None, partitions: str | None = None) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over each request's paged context; returns out [T, Hq, D].

    Drop-in for `paged_attention_torch`. Keyword-only extras:
      out: write into this [T, Hq, D] tensor (e.g. a CUDA-graph buffer) instead of a new one.
      partition_size: decode split-K partition, in keys (multiple of the decode key tile, 64);
        default from `decode_partition_size`.
      max_decode_seq_len: bound on decode seq lens used to size the decode grid (and, when
        partition_size is None, to choose it); default the batch's max from meta.seq_lens_cpu.
        Pass max_model_len when capturing a CUDA graph: the grid then depends only on the batch
        size and stays valid for any later seq lens (partitions past a request's end exit at once;
        padding decodes with seq_len 0 get zero rows).
      block_m, block_n: prefill tile rows (query tokens x group) and keys; default `prefill_config`.
      partitions: "fixed" or "dynamic" (see DECODE_PARTITIONS, the default); "dynamic" applies
        when the decode is split and partition_size is not given.
    """
    num_tokens, num_heads, head_dim = q.shape
    two, _, block_size, num_kv_heads, kv_head_dim = kv_cache.shape
    assert two == 2 and kv_head_dim == head_dim, (q.shape, kv_cache.shape)
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1, "head dim must be contiguous"
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    num_reqs = len(meta.seq_lens_cpu)
    nd = meta.num_decodes
    if num_tokens == 0 or num_reqs == 0:
        return out
    check_launchable(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out)
    assert meta.block_tables.dtype == torch.int32 and meta.seq_lens.dtype == torch.int32
    assert meta.query_start_loc.dtype == torch.int32

    if q.dtype != kv_cache.dtype:
        raise TypeError(f"q is {q.dtype} but the KV cache is {kv_cache.dtype}: tl.dot needs one dtype")
    upcast = kernels_interpreted()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    block_d = max(_MIN_DOT, triton.next_power_of_2(head_dim))
    scale_log2 = float(scale) * _LOG2E
    kv_strides = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))
    bt = meta.block_tables

    if nd:
        # Decode key tile (any block size: keys are gathered one by one through the table); an
        # explicit partition_size below it (tests) shrinks it.
        dcfg = decode_config(head_dim, group, q.element_size())
        block_n_dec = dcfg["block_n"]
        if partition_size is not None:
            block_n_dec = max(_MIN_DOT, min(block_n_dec, partition_size))
        max_len = max_decode_seq_len if max_decode_seq_len is not None else max(meta.seq_lens_cpu[:nd])
        assert partition_size is None or partition_size % block_n_dec == 0 or partition_size >= max_len, \
            f"partition_size must be a multiple of {block_n_dec}"
        explicit_partition = partition_size is not None
        if partition_size is None:
            partition_size = decode_partition_size(nd, num_kv_heads, max_len, _sm_count(q.device), block_n_dec)
        num_parts = triton.cdiv(max_len, partition_size)
        split = num_parts > 1
        mode = partitions or DECODE_PARTITIONS
        if mode not in ("fixed", "dynamic"):
            raise ValueError(f"partitions must be 'fixed' or 'dynamic', got {mode!r}")
        dynamic = split and mode == "dynamic" and not explicit_partition
        # Both decode kernels launch as programmatic dependents of the kernel before them (kernels/pdl.py):
        # at batch 1 each layer's attention is two kernels of a few microseconds.
        pdl = pdl_launch_args(q.device)
        if split:
            part_out = torch.empty((nd, num_heads, num_parts, head_dim), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((nd, num_heads, num_parts), dtype=torch.float32, device=q.device)
        else:
            part_out = part_lse = out  # unused
        _decode_kernel[(nd, num_kv_heads, num_parts)](
            q, kv_cache, out, part_out, part_lse, bt, meta.seq_lens,
            scale_log2, partition_size,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *kv_strides, bt.stride(0),
            num_heads * num_parts * head_dim, num_parts * head_dim, head_dim,
            GROUP=group, BLOCK_G=max(_MIN_DOT, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
            BLOCK_N=block_n_dec, HEAD_DIM=head_dim, BLOCK_D=block_d, SPLIT=split, DYNAMIC=dynamic,
            UPCAST=upcast, DOT_PRECISION=precision, **pdl,
            num_warps=dcfg["num_warps"], num_stages=dcfg["num_stages"],
        )
        if split:
            _decode_reduce_kernel[(nd, num_heads)](
                out, part_out, part_lse, meta.seq_lens, partition_size, num_parts,
                out.stride(0), out.stride(1),
                num_heads * num_parts * head_dim, num_parts * head_dim, head_dim,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=min(32, triton.next_power_of_2(num_parts)),
                BLOCK_N=block_n_dec, DYNAMIC=dynamic, **pdl, num_warps=4,
            )

    num_prefills = num_reqs - nd
    if num_prefills:
        cfg = prefill_config(head_dim, group, q.element_size())
        bm = max(block_m or cfg["block_m"], _MIN_DOT, triton.next_power_of_2(group))
        bn = max(block_n or cfg["block_n"], _MIN_DOT)
        block_q = bm // group
        prefill_tokens = num_tokens - nd  # decodes are the first nd tokens
        grid = (prefill_tokens // block_q + num_prefills, num_kv_heads)
        _prefill_kernel[grid](
            q, kv_cache, out, bt, meta.seq_lens, meta.query_start_loc,
            scale_log2, nd, num_prefills,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *kv_strides, bt.stride(0),
            GROUP=group, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_Q=block_q, BLOCK_N=bn,
            HEAD_DIM=head_dim, BLOCK_D=block_d, UPCAST=upcast, DOT_PRECISION=precision,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out
