"""Benchmark of tokenmill's Triton kernels against the PyTorch reference path (not a test).

On CUDA, at Llama-3-8B shapes (32 query heads, 8 kv heads, head_dim 128, block size 16, bf16):
  - checks every kernel against its torch reference (max abs error, plus exact-match counts for the
    elementwise kernels, which emulate the reference's rounding),
  - times each with triton.testing.do_bench (median), next to the torch reference path (paged
    gather + SDPA) and plain SDPA on contiguous K/V (no paging: what the gather costs),
  - reports decode as achieved GB/s (K/V bytes read + q/out) against a measured device-to-device
    copy bandwidth (bytes read + written), prefill as TFLOP/s (causal: 4 * D * Hq * visible keys
    per query), elementwise kernels as GB/s.
Prints a table and writes <out>/kernels_bench.json.

  python benchmarks/kernels_bench.py --out results/            # on the GPU
  python benchmarks/kernels_bench.py --smoke --out /tmp/kb     # CPU, TRITON_INTERPRET=1, tiny shapes:
                                                               # checks the script's logic, times nothing real
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if "--smoke" in sys.argv:  # must precede the first import of triton (see tokenmill/kernels/__init__.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import tokenmill.kernels as K  # noqa: E402
from tokenmill.kernels.paged_attention import decode_config, decode_partition_size  # noqa: E402
from tokenmill.layers.activation import silu_and_mul  # noqa: E402
from tokenmill.layers.attention import AttentionMetadata, _gather_kv, paged_attention_torch, write_kv  # noqa: E402
from tokenmill.layers.norm import RMSNorm  # noqa: E402
from tokenmill.layers.rotary import RotaryEmbedding  # noqa: E402


@dataclass
class Shape:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    hidden: int = 4096
    intermediate: int = 14336
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Row:
    """Times in ms; rates (metric units) from the graph times where there are any, else from do_bench."""
    name: str
    kind: str
    triton_ms: float
    torch_ms: float | None = None
    sdpa_ms: float | None = None
    metric: str = ""
    triton_rate: float | None = None
    torch_rate: float | None = None
    sdpa_rate: float | None = None
    max_err: float | None = None
    extra: dict = field(default_factory=dict)
    triton_graph_ms: float | None = None
    torch_graph_ms: float | None = None
    sdpa_graph_ms: float | None = None


class Timer:
    """`timer(fn)`: median ms of fn() by triton.testing.do_bench (includes the host's launch cost when
    the GPU work is shorter than it). `timer.graph(fn)`: median ms of one CUDA-graph replay of fn with
    the L2 flushed before each replay (device time alone: what a captured decode step pays)."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self._flush = None

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        times = []
        for _ in range(1 if self.smoke else 5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def graph(self, fn, reps: int = 50) -> float | None:
        if self.device.type != "cuda":
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:  # not capturable
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:100]})")
            return None
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        graph.replay()
        for i in range(reps):
            self._flush.zero_()  # evict K/V from L2; the GPU is busy here while the host enqueues
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbps(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def build_batch(specs, shape: Shape, device, seed=0):
    """specs [(seq_len, query_len)], decodes first. Random block placement; random K/V for every slot."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bs = shape.block_size
    needed = [math.ceil(s / bs) for s, _ in specs]
    num_blocks = sum(needed) + 1
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, new_slots = [], []
    max_blocks = max(needed)
    for n, (seq_len, q_len) in zip(needed, specs):
        blocks, perm = perm[:n], perm[n:]
        tables.append(blocks + [0] * (max_blocks - n))
        new_slots += [blocks[p // bs] * bs + p % bs for p in range(seq_len - q_len, seq_len)]
    kv_cache = torch.randn((2, num_blocks, bs, shape.num_kv_heads, shape.head_dim), dtype=shape.dtype, device=device)
    q_lens = [ql for _, ql in specs]
    qsl = [0]
    for ql in q_lens:
        qsl.append(qsl[-1] + ql)
    q = torch.randn((qsl[-1], shape.num_heads, shape.head_dim), dtype=shape.dtype, device=device)
    nd = 0
    while nd < len(specs) and q_lens[nd] == 1:
        nd += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(new_slots, dtype=torch.long, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s for s, _ in specs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens_cpu=[s for s, _ in specs], query_lens_cpu=q_lens, num_decodes=nd)
    return q, kv_cache, meta


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def attention_bytes(specs, shape: Shape) -> int:
    elt = torch.finfo(shape.dtype).bits // 8
    kv = sum(s for s, _ in specs) * shape.num_kv_heads * shape.head_dim * 2 * elt
    qo = sum(ql for _, ql in specs) * shape.num_heads * shape.head_dim * 2 * elt
    return kv + qo


def attention_flops(specs, shape: Shape) -> int:
    """Causal: query i of a chunk sees ctx + i + 1 keys; QK^T and PV cost 2 * D flops per key each."""
    keys = sum(ql * (s - ql) + ql * (ql + 1) // 2 for s, ql in specs)
    return 4 * shape.head_dim * shape.num_heads * keys


def sdpa_contiguous(q, kv_cache, meta, scale):
    """SDPA on K/V already gathered into contiguous [R, Hkv, L, D] (outside the timed region): the cost
    of attention alone, without the paged gather. Returns a closure to time."""
    nd = meta.num_decodes
    calls = []
    if nd:
        max_len = max(meta.seq_lens_cpu[:nd])
        k, v = _gather_kv(kv_cache, meta.block_tables[:nd], max_len)
        dq = q[:nd].unsqueeze(2)
        if min(meta.seq_lens_cpu[:nd]) == max_len:
            calls.append(lambda: F.scaled_dot_product_attention(dq, k, v, scale=scale, enable_gqa=True))
        else:
            pos = torch.arange(max_len, device=q.device)
            mask = (pos[None, :] < meta.seq_lens[:nd, None]).view(nd, 1, 1, max_len)
            calls.append(lambda: F.scaled_dot_product_attention(dq, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=True))
    start = nd
    for r in range(nd, len(meta.seq_lens_cpu)):
        ql, sl = meta.query_lens_cpu[r], meta.seq_lens_cpu[r]
        k, v = _gather_kv(kv_cache, meta.block_tables[r:r + 1], sl)
        pq = q[start:start + ql].transpose(0, 1).unsqueeze(0)
        if ql == sl:
            calls.append(lambda pq=pq, k=k, v=v: F.scaled_dot_product_attention(pq, k, v, is_causal=True, scale=scale,
                                                                                enable_gqa=True))
        else:
            q_pos = torch.arange(sl - ql, sl, device=q.device)
            mask = torch.arange(sl, device=q.device)[None, :] <= q_pos[:, None]
            calls.append(lambda pq=pq, k=k, v=v, mask=mask: F.scaled_dot_product_attention(
                pq, k, v, attn_mask=mask, scale=scale, enable_gqa=True))
        start += ql

    def run():
        for c in calls:
            c()
    return run


def bench_attention(name, specs, shape, device, timer, rows, kind):
    q, kv_cache, meta = build_batch(specs, shape, device)
    scale = shape.head_dim ** -0.5
    out = K.paged_attention_triton(q, kv_cache, meta, scale)
    ref = paged_attention_torch(q, kv_cache, meta, scale)
    err = rel_err(out, ref)
    tri_fn = lambda: K.paged_attention_triton(q, kv_cache, meta, scale)  # noqa: E731
    ref_fn = lambda: paged_attention_torch(q, kv_cache, meta, scale)  # noqa: E731
    sdpa_fn = sdpa_contiguous(q, kv_cache, meta, scale)
    t_tri, t_ref, t_sdpa = timer(tri_fn), timer(ref_fn), timer(sdpa_fn)
    g_tri, g_ref, g_sdpa = timer.graph(tri_fn), timer.graph(ref_fn), timer.graph(sdpa_fn)
    extra = {"specs": [list(s) for s in specs[:4]] + ([f"... {len(specs)} requests"] if len(specs) > 4 else [])}
    if kind == "decode":
        nd = meta.num_decodes
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        part = decode_partition_size(nd, shape.num_kv_heads, max(meta.seq_lens_cpu[:nd]), sms,
                                     decode_config(shape.head_dim, shape.num_heads // shape.num_kv_heads)["block_n"])
        parts = math.ceil(max(meta.seq_lens_cpu[:nd]) / part)
        extra.update(partition_size=part, partitions=parts, programs=nd * shape.num_kv_heads * parts)
        nbytes = attention_bytes(specs, shape)
        rate = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
        metric = "GB/s"
    else:
        flops = attention_flops(specs, shape)
        rate = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
        metric = "TFLOP/s"
    pick = lambda g, t: g if g is not None else t  # noqa: E731
    rows.append(Row(name, kind, t_tri, t_ref, t_sdpa, metric, rate(pick(g_tri, t_tri)), rate(pick(g_ref, t_ref)),
                    rate(pick(g_sdpa, t_sdpa)), err, extra, g_tri, g_ref, g_sdpa))


def bench_elementwise(shape, device, timer, rows, num_tokens):
    dt, elt = shape.dtype, torch.finfo(shape.dtype).bits // 8
    gb = lambda nbytes, ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731

    # RMSNorm with the residual add (the decoder layer's shape).
    norm = RMSNorm(shape.hidden, 1e-5).to(device=device, dtype=dt)
    norm.weight.data.normal_()
    x = torch.randn(num_tokens, shape.hidden, device=device, dtype=dt)
    res = torch.randn_like(x)
    out, new_res = K.rms_norm_triton(x, norm.weight, 1e-5, res)
    ref_out, ref_res = norm(x, res)
    n = 4 * x.numel() * elt  # read x, residual; write out, residual
    t, tr = timer(lambda: K.rms_norm_triton(x, norm.weight, 1e-5, res)), timer(lambda: norm(x, res))
    rows.append(Row(f"rms_norm+residual T={num_tokens} H={shape.hidden}", "elementwise", t, tr, None, "GB/s",
                    gb(n, t), gb(n, tr), None, max(rel_err(out, ref_out), rel_err(new_res, ref_res)),
                    {"exact_fraction": (out == ref_out).float().mean().item(),
                     "residual_exact": bool(torch.equal(new_res, ref_res))}))

    gate_up = torch.randn(num_tokens, 2 * shape.intermediate, device=device, dtype=dt)
    out, ref = K.silu_and_mul_triton(gate_up), silu_and_mul(gate_up)
    n = gate_up.numel() * elt * 3 // 2
    t, tr = timer(lambda: K.silu_and_mul_triton(gate_up)), timer(lambda: silu_and_mul(gate_up))
    rows.append(Row(f"silu_and_mul T={num_tokens} I={shape.intermediate}", "elementwise", t, tr, None, "GB/s",
                    gb(n, t), gb(n, tr), None, rel_err(out, ref),
                    {"exact_fraction": (out == ref).float().mean().item()}))

    rope = RotaryEmbedding(shape.head_dim, 8192, 500000.0, {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}).to(device)
    qkv = torch.randn(num_tokens, (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim, device=device, dtype=dt)
    q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    q = qkv[:, :q_size].view(num_tokens, shape.num_heads, shape.head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, shape.num_kv_heads, shape.head_dim)
    positions = torch.randint(0, 8192, (num_tokens,), device=device)
    (oq, ok), (rq, rk) = K.rotary_triton(positions, q, k, rope.cos_cached, rope.sin_cached), rope(positions, q, k)
    n = 2 * (q.numel() + k.numel()) * elt
    t = timer(lambda: K.rotary_triton(positions, q, k, rope.cos_cached, rope.sin_cached))
    tr = timer(lambda: rope(positions, q, k))
    err = max(rel_err(oq, rq), rel_err(ok, rk))
    rows.append(Row(f"rotary T={num_tokens} Hq={shape.num_heads} Hkv={shape.num_kv_heads}", "elementwise", t, tr,
                    None, "GB/s", gb(n, t), gb(n, tr), None, err,
                    {"exact_fraction": ((oq == rq).float().mean().item() + (ok == rk).float().mean().item()) / 2}))

    num_blocks = math.ceil(num_tokens / shape.block_size) * 2
    cache = torch.zeros(2, num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim, device=device, dtype=dt)
    cache_ref = cache.clone()
    v = qkv[:, q_size + kv_size:].view(num_tokens, shape.num_kv_heads, shape.head_dim)
    slots = torch.randperm(num_blocks * shape.block_size, device=device)[:num_tokens]
    K.write_kv_triton(cache, k, v, slots)
    write_kv(cache_ref, k, v, slots)
    n = 4 * k.numel() * elt
    t, tr = timer(lambda: K.write_kv_triton(cache, k, v, slots)), timer(lambda: write_kv(cache_ref, k, v, slots))
    rows.append(Row(f"write_kv T={num_tokens}", "elementwise", t, tr, None, "GB/s", gb(n, t), gb(n, tr), None,
                    rel_err(cache, cache_ref),
                    {"exact": bool(torch.equal(cache, cache_ref))}))

    # RoPE + KV write in one launch (the general path's) against the two launches it replaces.
    fused_cache = torch.zeros_like(cache)
    fq = K.rotary_write_kv_triton(positions, q, k, v, rope.cos_cached, rope.sin_cached, fused_cache, slots)
    two = torch.zeros_like(cache)
    K.write_kv_triton(two, rk, v, slots)
    n = 2 * (q.numel() + 2 * k.numel()) * elt  # read q, k, v; write q, k, v (into the cache)

    def unfused():
        tq, tk = K.rotary_triton(positions, q, k, rope.cos_cached, rope.sin_cached)
        K.write_kv_triton(two, tk, v, slots)

    t = timer(lambda: K.rotary_write_kv_triton(positions, q, k, v, rope.cos_cached, rope.sin_cached, fused_cache,
                                               slots))
    tr = timer(unfused)
    rows.append(Row(f"rotary+write_kv T={num_tokens} (vs the two launches)", "elementwise", t, tr, None, "GB/s",
                    gb(n, t), gb(n, tr), None, max(rel_err(fq, rq), rel_err(fused_cache, two)),
                    {"exact": bool(torch.equal(fq, oq) and torch.equal(fused_cache, two))}))


def sweep(shape, device, timer, smoke: bool) -> list[dict]:
    """Time other tile configurations of the attention kernels (for choosing the defaults)."""
    import importlib

    # importlib, not `import ... as`: the package attribute `paged_attention` is the dispatch function.
    PA = importlib.import_module("tokenmill.kernels.paged_attention")

    out = []
    scale = shape.head_dim ** -0.5
    if smoke:
        pre_cases = [("prefill 2x16 +prefix 20", [(36, 16)] * 2)]
        dec_cases = [("decode b1 ctx 300", [(300, 1)], [None, 64])]
    else:
        pre_cases = [("prefill 1x512", [(512, 512)]), ("prefill 4x2048 +prefix 1024", [(3072, 2048)] * 4)]
        dec_cases = [("decode b1 ctx 8192", [(8192, 1)], [None, 128, 512, 1024, 2048, 8192]),
                     ("decode b8 ctx 4096", [(4096, 1)] * 8, [None, 512, 1024, 4096]),
                     ("decode b64 ctx 1024", [(1024, 1)] * 64, [None, 256, 512]),
                     ("decode b256 ctx 768", [(768, 1)] * 256, [None, 256])]
    pre_cfgs = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
                for m, n, w, st in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2),
                                    (64, 64, 4, 3), (64, 32, 4, 2), (64, 128, 4, 2), (64, 64, 8, 2)]]
    dec_cfgs = [dict(block_n=n, num_warps=w, num_stages=st)
                for n, w, st in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2)]]
    orig_pre, orig_dec = PA.prefill_config, PA.decode_config
    try:
        for name, specs in pre_cases:
            q, kv_cache, meta = build_batch(specs, shape, device)
            ref = paged_attention_torch(q, kv_cache, meta, scale)
            flops = attention_flops(specs, shape)
            for cfg in pre_cfgs:
                PA.prefill_config = lambda d, g, e=2, cfg=cfg: dict(cfg)
                rec = dict(case=name, **cfg)
                try:
                    rec["rel_err"] = rel_err(PA.paged_attention_triton(q, kv_cache, meta, scale), ref)
                    fn = lambda: PA.paged_attention_triton(q, kv_cache, meta, scale)  # noqa: E731
                    rec["ms"] = timer(fn)
                    rec["graph_ms"] = timer.graph(fn)
                    rec["TFLOP/s"] = flops / ((rec["graph_ms"] or rec["ms"]) * 1e-3) / 1e12
                except Exception as e:  # a config that does not compile (e.g. out of shared memory)
                    rec["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                out.append(rec)
        PA.prefill_config = orig_pre
        for name, specs, parts in dec_cases:
            q, kv_cache, meta = build_batch(specs, shape, device)
            ref = paged_attention_torch(q, kv_cache, meta, scale)
            nbytes = attention_bytes(specs, shape)
            for cfg in dec_cfgs:
                PA.decode_config = lambda d, g, e=2, cfg=cfg: dict(cfg)
                for part in parts:
                    if part is not None and part % cfg["block_n"]:
                        continue
                    rec = dict(case=name, partition_size=part or "auto", **cfg)
                    try:
                        fn = lambda part=part: PA.paged_attention_triton(  # noqa: E731
                            q, kv_cache, meta, scale, partition_size=part)
                        rec["rel_err"] = rel_err(fn(), ref)
                        rec["ms"] = timer(fn)
                        rec["graph_ms"] = timer.graph(fn)
                        rec["GB/s"] = nbytes / ((rec["graph_ms"] or rec["ms"]) * 1e-3) / 1e9
                    except Exception as e:
                        rec["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    out.append(rec)
    finally:
        PA.prefill_config, PA.decode_config = orig_pre, orig_dec
    for rec in out:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
    return out


def cases(smoke: bool):
    """(name, kind, specs). Smoke: the same structure at tiny sizes."""
    if smoke:
        return [
            ("decode b1 ctx 300", "decode", [(300, 1)]),
            ("decode b4 ctx 40", "decode", [(40, 1)] * 4),
            ("prefill 1x24", "prefill", [(24, 24)]),
            ("prefill 2x16 +prefix 20", "prefill", [(36, 16)] * 2),
            ("mixed 3 dec ctx 33 + 1x8 +prefix 9", "mixed", [(33, 1)] * 3 + [(17, 8)]),
        ]
    return [
        ("decode b1 ctx 8192", "decode", [(8192, 1)]),
        ("decode b64 ctx 1024", "decode", [(1024, 1)] * 64),
        ("decode b256 ctx 768", "decode", [(768, 1)] * 256),
        ("prefill 1x512", "prefill", [(512, 512)]),
        ("prefill 4x2048 +prefix 1024", "prefill", [(3072, 2048)] * 4),
        ("mixed 32 dec ctx 1024 + 1x512 +prefix 512", "mixed", [(1024, 1)] * 32 + [(1024, 512)]),
    ]


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="directory for kernels_bench.json")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes (logic check)")
    ap.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    ap.add_argument("--sweep", action="store_true", help="also time other attention tile configurations")
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        shape = Shape(num_heads=4, num_kv_heads=2, head_dim=32, hidden=64, intermediate=96)
        if not K.kernels_interpreted():
            sys.exit("--smoke needs TRITON_INTERPRET=1 before triton is imported")
        num_tokens, copy_bytes = 16, 1 << 24
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --smoke for a CPU logic check")
        device = torch.device("cuda")
        shape = Shape()
        num_tokens, copy_bytes = 4096, 1 << 30
    torch.manual_seed(0)
    timer = Timer(device, args.smoke)
    copy_bw = copy_bandwidth_gbps(device, timer, copy_bytes)

    rows: list[Row] = []
    only = [s for s in args.only.split(",") if s]
    with torch.inference_mode():
        for name, kind, specs in cases(args.smoke):
            if only and not any(s in name for s in only):
                continue
            bench_attention(name, specs, shape, device, timer, rows, kind)
        if not only or any(s in "elementwise" for s in only):
            bench_elementwise(shape, device, timer, rows, num_tokens)

        sweep_rows = sweep(shape, device, timer, args.smoke) if args.sweep else []

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {dev_name}   torch {torch.__version__}   triton {triton.__version__}   "
          f"copy bandwidth (read+write): {copy_bw:.0f} GB/s")
    print(f"shape: Hq={shape.num_heads} Hkv={shape.num_kv_heads} D={shape.head_dim} block={shape.block_size} "
          f"{str(shape.dtype).replace('torch.', '')}")
    print("ms: do_bench median (host launch cost included); graph: one CUDA-graph replay, cold L2 (device "
          "time); rates from graph times where captured. torch = reference path (paged gather + SDPA), "
          "sdpa = SDPA on pre-gathered contiguous K/V.")
    head = (f"{'case':42s} {'triton ms':>9s} {'graph':>7s} {'torch ms':>8s} {'graph':>7s} {'sdpa ms':>7s} "
            f"{'graph':>7s} {'unit':>7s} {'triton':>8s} {'torch':>8s} {'sdpa':>8s} {'%copy':>5s} "
            f"{'rel err':>8s}  notes")
    print(head)
    print("-" * len(head))
    for r in rows:
        pct = f"{100 * r.triton_rate / copy_bw:.0f}" if r.metric == "GB/s" and r.triton_rate else "-"
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items() if k != "specs")
        print(f"{r.name:42s} {fmt(r.triton_ms):>9s} {fmt(r.triton_graph_ms):>7s} {fmt(r.torch_ms):>8s} "
              f"{fmt(r.torch_graph_ms):>7s} {fmt(r.sdpa_ms):>7s} {fmt(r.sdpa_graph_ms):>7s} {r.metric:>7s} "
              f"{fmt(r.triton_rate, '.1f'):>8s} {fmt(r.torch_rate, '.1f'):>8s} {fmt(r.sdpa_rate, '.1f'):>8s} "
              f"{pct:>5s} {fmt(r.max_err, '.2e'):>8s}  {notes}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "device": dev_name, "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
        "shape": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in shape.__dict__.items()},
        "copy_bandwidth_gbps": copy_bw,
        "rows": [r.__dict__ for r in rows],
        "sweep": sweep_rows,
    }
    (out_dir / "kernels_bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / 'kernels_bench.json'}   (rel err = max |triton - torch| / max |torch|)")
    # The interpreter's fp32 -> bf16 casts truncate (the GPU's round to nearest even): looser in --smoke.
    bad = [r.name for r in rows if r.max_err is not None and not r.max_err < (3e-2 if args.smoke else 1e-2)]
    if bad:
        print(f"WARNING: large error vs the torch reference in: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
