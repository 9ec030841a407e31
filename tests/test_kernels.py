"""Triton kernels (tokenmill.kernels) against the PyTorch reference path, on the CPU through Triton's
interpreter at tiny sizes, or on the GPU with compiled kernels when there is one.

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, and that includes
triton's own library (tl.sum, tl.max, tl.cdiv are @jit functions, decorated when `triton` is first
imported); the interpreter also re-reads it at launch (lazy imports assert it). So without CUDA:
- if nothing has imported triton yet, this module sets TRITON_INTERPRET=1 and leaves it set (the
  process then runs any Triton code in the interpreter; no other test module uses Triton on a CPU
  machine) and runs the tests in-process;
- if triton was already imported in compiled mode (in the full suite, `from transformers import
  AutoModelForCausalLM` in earlier test modules imports it), the module collects one test,
  `test_kernels_in_fresh_interpreter`, which runs this file in a fresh `python -m pytest` with
  TRITON_INTERPRET=1 and fails with its output if any kernel test fails. (Setting
  TRITON_INTERPRET=1 in tests/conftest.py on CUDA-less machines would make that detour unneeded.)
With CUDA it leaves the variable alone and tests the compiled kernels on the GPU (run
`TRITON_INTERPRET=1 pytest tests/test_kernels.py` to force the interpreter there).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed; the kernels cannot be tested")


def _version(mod) -> tuple[int, int]:
    return tuple(int(p) for p in mod.__version__.split(".")[:2])


import tokenmill.kernels as K  # noqa: E402

from tokenmill.kernels.paged_attention import decode_partition_size  # noqa: E402
from tokenmill.layers.activation import silu_and_mul  # noqa: E402
from tokenmill.layers.attention import AttentionMetadata, paged_attention_torch, write_kv  # noqa: E402
from tokenmill.layers.norm import RMSNorm  # noqa: E402
from tokenmill.layers.rotary import RotaryEmbedding  # noqa: E402

# Compiled kernels and no GPU: run this file again in a fresh interpreter (see the docstring).
RERUN_IN_SUBPROCESS = not K.kernels_interpreted() and not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and not K.kernels_interpreted() else "cpu"

if K.kernels_interpreted() and _version(triton) < (3, 7):
    import numpy

    if _version(numpy) >= (2, 4):
        pytest.skip(f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                    "(int() of 1-element arrays); install triton>=3.7 to test the kernels on the CPU",
                    allow_module_level=True)

POISON = 100.0  # fills every cache slot that holds no token: a kernel reading one is visibly wrong
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _cdiv(a, b):
    return -(-a // b)


def make_batch(specs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=3):
    """specs: [(seq_len, query_len)] in batch order (decodes first). Builds a poisoned paged cache holding
    every request's context, randomly placed blocks, q for the new tokens and the metadata."""
    gen = torch.Generator().manual_seed(seed)
    needed = [_cdiv(s, block_size) for s, _ in specs]
    num_blocks = sum(needed) + spare_blocks
    max_blocks = max(needed) + 1  # one padding column
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots_all = [], []
    for n, (seq_len, _) in zip(needed, specs):
        blocks, perm = perm[:n], perm[n:]
        tables.append(blocks + [0] * (max_blocks - n))
        slots_all.append([blocks[p // block_size] * block_size + p % block_size for p in range(seq_len)])
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), POISON, dtype=dtype)
    for slots in slots_all:
        k = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
        write_kv(kv_cache, k, v, torch.tensor(slots, dtype=torch.long))
    q_lens = [ql for _, ql in specs]
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    qsl = [0]
    for ql in q_lens:
        qsl.append(qsl[-1] + ql)
    new_slots = [s for slots, (_, ql) in zip(slots_all, specs) for s in slots[len(slots) - ql:]]
    num_decodes = 0
    while num_decodes < len(specs) and q_lens[num_decodes] == 1:
        num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(new_slots, dtype=torch.long, device=DEVICE),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([s for s, _ in specs], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens_cpu=[s for s, _ in specs], query_lens_cpu=q_lens, num_decodes=num_decodes)
    return q.to(DEVICE), kv_cache.to(DEVICE), meta


def _reference(q, kv_cache, meta, scale):
    """The torch path, in fp32 on the CPU (the bf16 kernel is compared with exact math)."""
    cpu = AttentionMetadata(meta.slot_mapping.cpu(), meta.block_tables.cpu(), meta.seq_lens.cpu(),
                            meta.query_start_loc.cpu(), meta.seq_lens_cpu, meta.query_lens_cpu, meta.num_decodes)
    return paged_attention_torch(q.float().cpu(), kv_cache.float().cpu(), cpu, scale)


def _check_attention(specs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, **kw):
    q, kv_cache, meta = make_batch(specs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   block_size=block_size, dtype=dtype, seed=seed)
    scale = head_dim ** -0.5
    out = K.paged_attention_triton(q, kv_cache, meta, scale, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = _reference(q, kv_cache, meta, scale)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float().cpu(), ref, **TOL[dtype])
    if dtype != torch.float32:  # the 16-bit torch path itself is as far from exact as the kernel
        ref16 = paged_attention_torch(q.cpu(), kv_cache.cpu(), AttentionMetadata(
            meta.slot_mapping.cpu(), meta.block_tables.cpu(), meta.seq_lens.cpu(), meta.query_start_loc.cpu(),
            meta.seq_lens_cpu, meta.query_lens_cpu, meta.num_decodes), scale)
        torch.testing.assert_close(out.float().cpu(), ref16.float(), **TOL[dtype])
    return out


# Decodes at block boundaries (bs-1, bs, bs+1, 2bs, 1), then prefills: from scratch, with a cached
# prefix that ends mid-block, a one-token chunk, and a chunk that starts exactly on a block boundary.
def _mixed_specs(bs):
    return [(bs - 1, 1), (bs, 1), (bs + 1, 1), (2 * bs, 1), (1, 1),
            (bs + 3, bs + 3), (3 * bs + 2, bs + 5), (2 * bs + 1, 1), (3 * bs, bs)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", [
    (4, 4, 16, 16, torch.float32),   # MHA (group 1)
    (4, 2, 32, 16, torch.float32),   # GQA 2
    (8, 2, 16, 8, torch.float32),    # GQA 4, small blocks
    (4, 1, 16, 32, torch.float32),   # MQA, large blocks
    (4, 2, 32, 16, torch.bfloat16),
    (8, 2, 16, 8, torch.bfloat16),
    (6, 2, 24, 16, torch.float32),   # group 3 (not a power of 2), head_dim 24 (padded to 32)
    (4, 2, 32, 32, torch.float16),
])
def test_paged_attention_mixed_batch(num_heads, num_kv_heads, head_dim, block_size, dtype):
    _check_attention(_mixed_specs(block_size), num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, block_size=block_size, dtype=dtype)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (6, 2)])
def test_paged_attention_prefill_many_tiles(num_heads, num_kv_heads):
    # block_m 16: 16 // group query tokens per tile, so every request spans several tiles and the
    # device-side tile -> request search sees ragged tile counts (chunks of 1, 5, 7, 13 and 16 queries).
    specs = [(5, 5), (13, 7), (30, 13), (9, 1), (40, 16)]
    _check_attention(specs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=16, block_size=8,
                     dtype=torch.float32, block_m=16, block_n=16)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype", [
    (4, 2, 64, torch.bfloat16),
    (8, 1, 128, torch.float16),
    (4, 4, 128, torch.float32),
])
def test_paged_attention_real_head_dims_default_tiles(num_heads, num_kv_heads, head_dim, dtype):
    # Default tile sizes (128 rows x 64 keys): prefixes longer than a key tile exercise the unmasked
    # loop; a 130-token prefill spans several query tiles.
    specs = [(150, 1), (70, 1), (300, 20), (130, 130), (97, 33)]
    _check_attention(specs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=16,
                     dtype=dtype)


def test_paged_attention_only_decodes_and_only_prefills():
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    _check_attention([(7, 1), (16, 1), (33, 1)], **kw)
    _check_attention([(20, 20), (35, 4)], **kw)


@pytest.mark.parametrize("num_heads,num_kv_heads,dtype,partition", [
    (4, 1, torch.float32, 16),   # MQA, 16-key partitions: up to 13 per request
    (8, 2, torch.bfloat16, 32),
    (4, 4, torch.float32, 32),
])
def test_paged_attention_decode_split_k(num_heads, num_kv_heads, dtype, partition):
    # Contexts spanning many partitions, ending on / next to partition and block boundaries.
    specs = [(200, 1), (15, 1), (64, 1), (65, 1), (129, 1), (1, 1)]
    _check_attention(specs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=16, block_size=16,
                     dtype=dtype, partition_size=partition)


def test_paged_attention_decode_grid_bound_for_graphs():
    # max_decode_seq_len larger than any seq len (as a captured CUDA graph would pass): the extra
    # partitions must exit without touching the result; a new `out` buffer is filled in place.
    q, kv_cache, meta = make_batch([(40, 1), (3, 1), (17, 1)], num_heads=4, num_kv_heads=2, head_dim=16,
                                   block_size=8, dtype=torch.float32)
    out = torch.full_like(q, float("nan"))
    res = K.paged_attention_triton(q, kv_cache, meta, 0.25, out=out, partition_size=16, max_decode_seq_len=160)
    assert res is out
    torch.testing.assert_close(out.cpu(), _reference(q, kv_cache, meta, 0.25), **TOL[torch.float32])


@pytest.mark.parametrize("partition", [16, None])
def test_paged_attention_zero_length_padding_decode(partition):
    # A CUDA-graph batch padded with dummy decodes of seq_len 0 (block table row of zeros): their
    # rows come out as zeros, with or without split-K, and the real rows are unaffected.
    q, kv_cache, meta = make_batch([(40, 1), (9, 1), (1, 1)], num_heads=4, num_kv_heads=2, head_dim=16,
                                   block_size=8, dtype=torch.float32)
    ref = _reference(q, kv_cache, meta, 0.25)
    meta.seq_lens[2] = 0
    meta.block_tables[2] = 0
    meta.seq_lens_cpu[2] = 0
    out = torch.full_like(q, float("nan"))
    K.paged_attention_triton(q, kv_cache, meta, 0.25, out=out, partition_size=partition, max_decode_seq_len=64)
    torch.testing.assert_close(out[:2].cpu(), ref[:2], **TOL[torch.float32])
    assert torch.equal(out[2].cpu(), torch.zeros_like(out[2].cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_dynamic_partitions(dtype):
    """partitions="dynamic" under a graph-sized grid: each request splits its own context over the
    grid's partitions (short ones into single key tiles); same results as the reference, padding
    rows (seq_len 0) zero, and a fixed partition_size still overrides it."""
    # 3 requests x 2 kv heads leave the interpreter's 4 "SMs" short of programs: the decode splits,
    # into 6 graph partitions of 704 keys (fixed); dynamic: 128-key partitions for the 700-token
    # context (6 of them), one 64-key partition for the 65-token one.
    specs = [(700, 1), (65, 1), (1, 1)]
    q, kv_cache, meta = make_batch(specs, num_heads=8, num_kv_heads=2, head_dim=16, block_size=16, dtype=dtype)
    assert decode_partition_size(3, 2, 4096, 4) == 704
    ref = _reference(q, kv_cache, meta, 0.25)
    meta.seq_lens[2] = 0
    meta.block_tables[2] = 0
    meta.seq_lens_cpu[2] = 0
    out = torch.full_like(q, float("nan"))
    K.paged_attention_triton(q, kv_cache, meta, 0.25, out=out, max_decode_seq_len=4096, partitions="dynamic")
    torch.testing.assert_close(out[:2].float().cpu(), ref[:2], **TOL[dtype])
    assert torch.equal(out[2].cpu(), torch.zeros_like(out[2].cpu()))
    with pytest.raises(ValueError, match="partitions must be 'fixed' or 'dynamic', got 'auto'"):
        K.paged_attention_triton(q, kv_cache, meta, 0.25, max_decode_seq_len=4096, partitions="auto")


def test_decode_partition_size_policy():
    # Batch 1 at 8k on an H100/H200 (132 SMs), 8 kv heads: 128-key partitions, 64 x 8 = 512 programs.
    assert decode_partition_size(1, 8, 8192, 132) == 128
    # A CUDA graph's grid for max_model_len 8464: 67 partitions of 128 (most exit at a short context).
    assert decode_partition_size(1, 8, 8464, 132) == 128
    # Plenty of programs already (64 x 8 = 512 >= 2 x 132): no split.
    assert decode_partition_size(64, 8, 1024, 132) >= 1024
    assert decode_partition_size(256, 8, 768, 132) >= 768
    # Short contexts are never split below the minimum partition (128 keys).
    assert decode_partition_size(1, 8, 128, 132) >= 128
    assert decode_partition_size(1, 8, 200, 132) == 128
    size = decode_partition_size(4, 8, 4000, 132)
    assert size % 64 == 0 and size >= 128 and _cdiv(4000, size) * 4 * 8 >= 132


def test_paged_attention_dispatch():
    q, kv_cache, meta = make_batch(_mixed_specs(8)[:7], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                                   dtype=torch.float32)
    ref = _reference(q, kv_cache, meta, 0.25)
    out = K.paged_attention(q, kv_cache, meta, 0.25, backend="triton")
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])
    torch.testing.assert_close(K.paged_attention(q, kv_cache, meta, 0.25, backend="torch").cpu(), ref,
                               **TOL[torch.float32])
    assert K.use_triton(q, "auto") == (q.is_cuda and K.HAS_TRITON)  # CPU tensors: the torch path
    assert not K.use_triton(q, "torch")
    with pytest.raises(ValueError):
        K.use_triton(q, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv(dtype):
    num_blocks, bs, hkv, d, t = 6, 8, 2, 16, 11
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=gen).to(dtype).to(DEVICE)
    # k, v as strided views of a fused projection output, like the model's split of qkv.
    qkv = torch.randn(t, (4 + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    _, k, v = qkv.split([4 * d, hkv * d, hkv * d], dim=-1)
    k, v = k.view(t, hkv, d), v.view(t, hkv, d)
    slots = torch.tensor([5, 0, 47, -1, 8, 9, -1, 31, 16, 2, -1], dtype=torch.long, device=DEVICE)
    expected = cache.clone()
    keep = slots >= 0
    write_kv(expected, k[keep], v[keep], slots[keep])
    K.write_kv_triton(cache, k, v, slots)
    assert torch.equal(cache, expected)
    # The dispatcher skips -1 slots on the torch path too.
    cache2 = expected.clone()
    K.write_kv(cache2, k, v, slots, backend="torch")
    assert torch.equal(cache2, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    gen = torch.Generator().manual_seed(4)
    hidden = 48  # not a power of 2: masked lanes
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = torch.randn(hidden, generator=gen).to(dtype)
    x = torch.randn(7, hidden, generator=gen).to(dtype)
    res = torch.randn(7, hidden, generator=gen).to(dtype)
    w = norm.weight.data.to(DEVICE)
    out = K.rms_norm_triton(x.to(DEVICE), w, 1e-5)
    torch.testing.assert_close(out.cpu(), norm(x), **TOL[dtype])
    out, new_res = K.rms_norm_triton(x.to(DEVICE), w, 1e-5, residual=res.to(DEVICE))
    ref_out, ref_res = norm(x, res)
    assert out.dtype == ref_out.dtype and new_res.dtype == ref_res.dtype
    torch.testing.assert_close(out.cpu(), ref_out, **TOL[dtype])
    torch.testing.assert_close(new_res.cpu(), ref_res, **TOL[dtype])
    # q/k-norm shape: a strided [T, heads, D] view of a fused projection, normalised per head.
    head_norm = RMSNorm(16, 1e-6).to(dtype)
    head_norm.weight.data = torch.randn(16, generator=gen).to(dtype)
    qkv = torch.randn(5, 3 * 4 * 16, generator=gen).to(dtype)
    qv = qkv[:, 16 * 4:2 * 16 * 4].view(5, 4, 16)
    qv_dev = qkv.to(DEVICE)[:, 16 * 4:2 * 16 * 4].view(5, 4, 16)
    assert not qv_dev.is_contiguous()
    got = K.rms_norm_triton(qv_dev, head_norm.weight.data.to(DEVICE), 1e-6)
    torch.testing.assert_close(got.cpu(), head_norm(qv), **TOL[dtype])
    # fp32 weight with bf16 activations promotes to fp32, as the reference does.
    if dtype == torch.bfloat16:
        norm32 = RMSNorm(hidden, 1e-5)
        norm32.weight.data = norm.weight.data.float()
        got = K.rms_norm_triton(x.to(DEVICE), norm32.weight.data.to(DEVICE), 1e-5)
        assert got.dtype == torch.float32
        # x.to(bf16) is rounded inside: the interpreter's fp32 -> bf16 cast truncates (the GPU's rounds
        # to nearest even), so allow a bf16 ulp here.
        torch.testing.assert_close(got.cpu(), norm32(x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    gate_up = (torch.randn(3, 5, 2 * 40, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    out = K.silu_and_mul_triton(gate_up.to(DEVICE))
    assert out.shape == (3, 5, 40)
    torch.testing.assert_close(out.cpu(), silu_and_mul(gate_up), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary(dtype, scaling):
    head_dim, t = 32, 9
    rope = RotaryEmbedding(head_dim, 256, 10000.0, scaling).to(DEVICE)
    gen = torch.Generator().manual_seed(6)
    positions = torch.tensor([0, 1, 2, 17, 100, 255, 3, 3, 64])
    qkv = torch.randn(t, (4 + 2 + 2) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :4 * head_dim].view(t, 4, head_dim)
    k = qkv[:, 4 * head_dim:6 * head_dim].view(t, 2, head_dim)
    ref_q, ref_k = rope(positions.to(DEVICE), q.to(DEVICE), k.to(DEVICE))
    got_q, got_k = K.rotary_triton(positions.to(DEVICE), q.to(DEVICE), k.to(DEVICE), rope.cos_cached, rope.sin_cached)
    torch.testing.assert_close(got_q, ref_q, **TOL[dtype])
    torch.testing.assert_close(got_k, ref_k, **TOL[dtype])
    # In place on the strided views of the fused buffer: v (the rest of it) untouched.
    qkv_dev = qkv.clone().to(DEVICE)
    qd = qkv_dev[:, :4 * head_dim].view(t, 4, head_dim)
    kd = qkv_dev[:, 4 * head_dim:6 * head_dim].view(t, 2, head_dim)
    rq, rk = K.rotary_triton(positions.to(DEVICE), qd, kd, rope.cos_cached, rope.sin_cached, inplace=True)
    assert rq is qd and rk is kd
    torch.testing.assert_close(qd, ref_q, **TOL[dtype])
    torch.testing.assert_close(kd, ref_k, **TOL[dtype])
    assert torch.equal(qkv_dev[:, 6 * head_dim:].cpu(), qkv[:, 6 * head_dim:])
    # RoPE + KV write in one launch: q as rotary's, the cache as write_kv of rotary's k (slot -1: nothing).
    v = qkv[:, 6 * head_dim:].view(t, 2, head_dim)
    slots = torch.tensor([3, 0, -1, 17, 8, 9, 30, -1, 1])
    cache = torch.full((2, 8, 4, 2, head_dim), POISON, dtype=dtype)
    expected = cache.clone()
    keep = slots >= 0
    write_kv(expected, ref_k.cpu()[keep], v[keep], slots[keep])
    dev_cache = cache.to(DEVICE)
    got_q = K.rotary_write_kv_triton(positions.to(DEVICE), q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                                     rope.cos_cached, rope.sin_cached, dev_cache, slots.to(DEVICE))
    torch.testing.assert_close(got_q, ref_q, **TOL[dtype])
    torch.testing.assert_close(dev_cache.cpu(), expected, **TOL[dtype])
    # With Qwen3's per-head q/k norms first.
    q_norm, k_norm = RMSNorm(head_dim, 1e-6).to(dtype), RMSNorm(head_dim, 1e-6).to(dtype)
    q_norm.weight.data = torch.randn(head_dim, generator=gen).to(dtype)
    k_norm.weight.data = torch.randn(head_dim, generator=gen).to(dtype)
    nq, nk = rope(positions.to(DEVICE), q_norm(q).to(DEVICE), k_norm(k).to(DEVICE))
    expected = cache.clone()
    write_kv(expected, nk.cpu()[keep], v[keep], slots[keep])
    dev_cache = cache.to(DEVICE)
    got_q = K.rotary_write_kv_triton(positions.to(DEVICE), q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                                     rope.cos_cached, rope.sin_cached, dev_cache, slots.to(DEVICE),
                                     q_norm_weight=q_norm.weight.data.to(DEVICE),
                                     k_norm_weight=k_norm.weight.data.to(DEVICE), eps=1e-6)
    torch.testing.assert_close(got_q, nq, **CHAIN_TOL[dtype])
    torch.testing.assert_close(dev_cache.cpu(), expected, **CHAIN_TOL[dtype])


# Fused chains (projection -> RoPE / SiLU / residual add) round 16-bit values 2-3 times in a row; a
# one-ulp flip of the projection's rounding (summation order; the interpreter truncates) carries
# through them. fp32 checks the math tightly; the 16-bit runs check the rounding path.
CHAIN_TOL = {**TOL, torch.bfloat16: dict(atol=5e-2, rtol=3e-2), torch.float16: dict(atol=5e-3, rtol=4e-3)}


def _fused_weights(gen, dtype, *shapes):
    return [(torch.randn(*shape, generator=gen) * 0.3).to(dtype) for shape in shapes]


# One row runs the broadcast path, or with mma=True the tl.dot path (as more rows always do).
# One row with several K chunks and a ragged last one (the test K's fit one default chunk), one row
# through tl.dot, and the tl.dot path at 16 and 64 padded rows.
GEMV_PATHS = [(1, None), (1, {"block_k": 16}), (1, {"mma": True}), (3, None), (33, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,config", GEMV_PATHS)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_norm_rope_kv(dtype, rows, config, bias):
    """RMSNorm -> qkv -> RoPE -> KV write in one kernel equals the four unfused steps; a slot of -1
    (a graph's padding row) writes nothing; cache slots of other tokens stay as they were."""
    from tokenmill.kernels.gemv import gemv_norm_rope_kv
    gen = torch.Generator().manual_seed(11)
    hidden, hq, hkv, d, block_size = 40, 4, 2, 32, 4
    x, w_qkv, b_qkv, nw = _fused_weights(gen, dtype, (rows, hidden), ((hq + 2 * hkv) * d, hidden),
                                         ((hq + 2 * hkv) * d,), (hidden,))
    x = x * 3
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = nw
    rope = RotaryEmbedding(d, 64, 10000.0, None)
    positions = torch.tensor([5, 0, 63] + [(7 * i) % 64 for i in range(3, rows)])[:rows]
    num_blocks = 12
    others = [i for i in torch.randperm(num_blocks * block_size, generator=gen).tolist() if i not in (9, 2)]
    slots = torch.tensor([9, -1, 2] + others)[:rows]  # distinct slots, one padding row
    cache = torch.full((2, num_blocks, block_size, hkv, d), POISON, dtype=dtype)
    # Reference: the unfused path's four steps.
    qkv = torch.nn.functional.linear(norm(x), w_qkv, b_qkv if bias else None)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    ref_q, ref_k = rope(positions, q.reshape(rows, hq, d), k.reshape(rows, hkv, d))
    ref_cache = cache.clone()
    keep = slots >= 0
    write_kv(ref_cache, ref_k[keep], v.reshape(rows, hkv, d)[keep], slots[keep])
    dev_cache = cache.to(DEVICE)
    got_q = gemv_norm_rope_kv(x.to(DEVICE), nw.to(DEVICE), 1e-5, w_qkv.to(DEVICE),
                              b_qkv.to(DEVICE) if bias else None, positions.to(DEVICE), rope.cos_cached.to(DEVICE),
                              rope.sin_cached.to(DEVICE), dev_cache, slots.to(DEVICE), hq, config=config)
    assert got_q.shape == (rows, hq, d)
    torch.testing.assert_close(got_q.cpu(), ref_q, **CHAIN_TOL[dtype])
    torch.testing.assert_close(dev_cache.cpu(), ref_cache, **CHAIN_TOL[dtype])
    untouched = torch.ones(2, num_blocks * block_size, dtype=torch.bool)
    untouched[:, slots[keep]] = False
    assert torch.equal(dev_cache.cpu().view(2, -1, hkv, d)[untouched], cache.view(2, -1, hkv, d)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,config", GEMV_PATHS)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_linear(dtype, rows, config, bias):
    """x @ W^T (+ b) (+ residual), optionally of RMSNorm(x), with N and K not multiples of the tiles."""
    from tokenmill.kernels.gemv import gemv_linear
    gen = torch.Generator().manual_seed(12)
    n, k = 70, 52
    x, w, b, res, nw = _fused_weights(gen, dtype, (rows, k), (n, k), (n,), (rows, n), (k,))
    b = b if bias else None
    dev = {name: t.to(DEVICE) if t is not None else None for name, t in dict(x=x, w=w, b=b, res=res, nw=nw).items()}
    ref = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(gemv_linear(dev["x"], dev["w"], dev["b"], config=config).cpu(), ref, **TOL[dtype])
    got = gemv_linear(dev["x"], dev["w"], dev["b"], residual=dev["res"], config=config)
    torch.testing.assert_close(got.cpu(), ref + res, **CHAIN_TOL[dtype])
    norm = RMSNorm(k, 1e-5).to(dtype)
    norm.weight.data = nw
    got = gemv_linear(dev["x"], dev["w"], dev["b"], norm_weight=dev["nw"], eps=1e-5, config=config)
    torch.testing.assert_close(got.cpu(), torch.nn.functional.linear(norm(x), w, b), **CHAIN_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,config", GEMV_PATHS)
def test_gemv_norm_silu(dtype, rows, config):
    """RMSNorm -> gate/up -> silu(gate) * up in one kernel equals the three unfused steps."""
    from tokenmill.kernels.gemv import gemv_norm_silu
    gen = torch.Generator().manual_seed(13)
    inter, hidden = 44, 48
    x, w, nw = _fused_weights(gen, dtype, (rows, hidden), (2 * inter, hidden), (hidden,))
    norm = RMSNorm(hidden, 1e-6).to(dtype)
    norm.weight.data = nw
    ref = silu_and_mul(torch.nn.functional.linear(norm(x * 2), w))
    got = gemv_norm_silu((x * 2).to(DEVICE), nw.to(DEVICE), 1e-6, w.to(DEVICE), None, config=config)
    assert got.shape == (rows, inter)
    torch.testing.assert_close(got.cpu(), ref, **CHAIN_TOL[dtype])


def test_gemv_rope_layout_rules():
    """Which head sizes the RoPE epilogue can split, and the error when asked anyway."""
    from tokenmill.kernels.gemv import gemv_norm_rope_kv, supports_rope_layout
    assert supports_rope_layout(1, 128) and supports_rope_layout(16, 128) and supports_rope_layout(1, 16)
    assert not supports_rope_layout(2, 16)  # tl.dot needs row sets of 16: a half head of 8 is too small
    x = torch.zeros(2, 8, device=DEVICE)
    cache = torch.zeros(2, 2, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 16: half heads must split into row sets of 16 at 2 rows"):
        gemv_norm_rope_kv(x, torch.ones(8, device=DEVICE), 1e-5, torch.zeros(48, 8, device=DEVICE), None,
                          torch.zeros(2, dtype=torch.long, device=DEVICE), torch.ones(4, 16, device=DEVICE),
                          torch.zeros(4, 16, device=DEVICE), cache, torch.zeros(2, dtype=torch.long, device=DEVICE), 1)


def test_gemv_rejects_large_batches():
    from tokenmill.kernels.gemv import MAX_FUSED_ROWS, gemv_linear
    x = torch.zeros(MAX_FUSED_ROWS + 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=f"at most {MAX_FUSED_ROWS} rows, got {MAX_FUSED_ROWS + 1}"):
        gemv_linear(x, torch.zeros(8, 8, device=DEVICE))


def test_gemv_tuned_configs_load(tmp_path, monkeypatch):
    """A gemv_bench --sweep file updates the launch configs and the engine's fused-row limit; unknown
    kernels, keys or limits out of range are errors naming them."""
    import copy
    import json

    from tokenmill.kernels import gemv
    monkeypatch.setattr(gemv, "GEMV_CONFIGS", copy.deepcopy(gemv.GEMV_CONFIGS))
    monkeypatch.setattr(gemv, "ENGINE_FUSED_ROWS", gemv.ENGINE_FUSED_ROWS)
    path = tmp_path / "gemv_configs.json"
    path.write_text(json.dumps({"configs": {"linear": {"hb": 8, "mma": True}}, "engine_fused_rows": 32}))
    untouched = dict(gemv.GEMV_CONFIGS["norm_silu"])
    gemv.load_tuned_configs(str(path))
    assert gemv.GEMV_CONFIGS["linear"]["hb"] == 8 and gemv.GEMV_CONFIGS["linear"]["mma"] is True
    assert gemv.GEMV_CONFIGS["norm_silu"] == untouched and gemv.ENGINE_FUSED_ROWS == 32
    cfg = gemv.GEMV_CONFIGS["linear"]  # mma: one row takes the tl.dot keys
    assert gemv._config("linear", 1, None) == ({"hb": max(16, cfg["dot_hb"]), "block_k": cfg["dot_block_k"],
                                                "num_warps": cfg["dot_num_warps"],
                                                "num_stages": cfg["dot_num_stages"], "fold": 1,
                                                "pdl": cfg["pdl"]}, True)
    before = copy.deepcopy(gemv.GEMV_CONFIGS)
    for bad, message in (({"configs": {"lin": {}}}, "unknown GEMV kernel 'lin'"),
                         ({"configs": {"linear": {"hbb": 1}}}, r"unknown keys \['hbb'\] for 'linear'"),
                         ({"configs": {"linear": {"pdl": "false"}}}, "linear.pdl must be true or false, got 'false'"),
                         ({"configs": {"linear": {"hb": 2}, "norm_silu": {"block_k": 1000}}},
                          "norm_silu.block_k must be a positive integer, a power of two, got 1000"),
                         ({"configs": {"linear": {"num_stages": 0}}}, "linear.num_stages must be a positive integer, got 0"),
                         ({"engine_fused_rows": 65}, r"engine_fused_rows must be an integer in \[0, 64\], got 65"),
                         ({"engine_fused_rows": True}, r"engine_fused_rows must be an integer in \[0, 64\], got True")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            gemv.load_tuned_configs(str(path))
        assert gemv.GEMV_CONFIGS == before and gemv.ENGINE_FUSED_ROWS == 32  # nothing applied


def test_gemv_tuned_configs_env_error_names_the_variable(tmp_path):
    """A bad TOKENMILL_GEMV_CONFIGS fails the import with the variable, the file and the problem."""
    path = tmp_path / "bad.json"
    path.write_text('{"configs": {"linear": {"hb": 3}}}')
    env = dict(os.environ, TOKENMILL_GEMV_CONFIGS=str(path))
    proc = subprocess.run([sys.executable, "-c", "import tokenmill.kernels.gemv"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0
    assert f"ValueError: TOKENMILL_GEMV_CONFIGS={path}: {path}: linear.hb must be a positive integer, a power of two, got 3" \
        in proc.stderr, proc.stderr[-2000:]


def test_kernels_compile_for_hopper():
    """Every kernel, launched by its real wrapper, compiles for sm_90 (what the interpreter cannot check:
    one type per variable across runtime ifs, tl.dot shapes, constexpr use) without spilling."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--shape", "tiny"], capture_output=True, text=True,
                          timeout=600, env=env)
    if proc.returncode != 0 and "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("triton without its NVIDIA backend")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.splitlines()[0]
    assert "0 failed" in summary and int(summary.split(": ")[1].split()[0]) >= 30, summary
    assert all(" spill    0 B" in line for line in proc.stdout.splitlines()[1:] if line.strip().startswith("ok")), \
        proc.stdout
    # Programmatic dependent launch: the fused GEMVs and the decode kernels wait for their
    # predecessor in the compiled code (griddepcontrol.wait); the general path's kernels do not.
    # Before the wait nothing is stored and nothing loaded, except the first weight chunk of the
    # one-row GEMVs (the PDL rule, tokenmill/kernels/pdl.py).
    lines = [line for line in proc.stdout.splitlines()[1:] if line.strip().startswith("ok")]
    pdl = {line.split()[1] for line in lines if "  pdl (" in line}
    assert pdl == {"_norm_rope_kv_kernel", "_linear_kernel", "_norm_silu_kernel", "_decode_kernel",
                   "_decode_reduce_kernel"}, proc.stdout
    for line in (line for line in lines if "  pdl (" in line):
        loads, stores = (int(n) for n in re.search(r"pdl \((\d+) ld, (\d+) st before the wait\)", line).groups())
        one_row = line.endswith("fused layer, 1 row(s)")
        assert stores == 0 and (loads > 0 if one_row else loads == 0), line


def test_compiled_kernels_refuse_cpu_tensors(monkeypatch):
    monkeypatch.setattr(K, "_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.check_launchable(torch.zeros(1))


def test_kernels_in_fresh_interpreter():
    """Only collected when RERUN_IN_SUBPROCESS: every other test of this file, in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=900)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    assert proc.returncode == 0, \
        f"kernel tests failed in the subprocess:\n{proc.stdout[-20000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in tail[0] and "failed" not in tail[0], proc.stdout[-4000:]
    print(tail[0])


# pytest collects the module's test_* attributes after import: keep only the one that applies.
if RERUN_IN_SUBPROCESS:
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_in_fresh_interpreter"]:
        del globals()[_name]
else:
    del test_kernels_in_fresh_interpreter
