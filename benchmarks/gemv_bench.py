"""The fused small-batch projections (tokenmill/kernels/gemv.py) against the general path's chains
they replace (cuBLAS linear + the Triton RMSNorm / RoPE+KV-write / SiLU kernels), at the 8B shape.

Each op runs over `--copies` distinct weight copies inside one CUDA graph (so the L2 holds none of
them and inter-kernel gaps count as they do in a decode step); times are per op. Reports weight
GB/s against the measured copy bandwidth, checks fused == unfused on the GPU (max abs difference,
fraction of bit-equal elements), and with --sweep times launch configs of each kernel at M=1.

    python benchmarks/gemv_bench.py --sweep --out DIR
    python benchmarks/gemv_bench.py --smoke            # CPU, TRITON_INTERPRET=1: the script's logic only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tokenmill.kernels as K  # noqa: E402
from tokenmill.kernels import gemv  # noqa: E402
from tokenmill.layers.rotary import RotaryEmbedding  # noqa: E402

SHAPE_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, block_size=16, blocks=512)
SHAPE_SMOKE = dict(hidden=64, heads=4, kv_heads=2, head_dim=32, inter=96, block_size=4, blocks=16)


def graph_ms(fns, device, reps: int = 30) -> float:
    """Median ms of one replay of a graph running every fn in `fns` in turn, divided by len(fns)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t0) * 1e3 / len(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(fns)


class Layer:
    """One decoder layer's projection weights and the inputs of each op."""

    def __init__(self, s: dict, m: int, device, dtype, gen):
        h, d = s["hidden"], s["head_dim"]
        qkv_rows = (s["heads"] + 2 * s["kv_heads"]) * d

        def rnd(*shape, scale=0.02):
            return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

        self.w_qkv, self.w_o = rnd(qkv_rows, h), rnd(h, s["heads"] * d)
        self.w_gu, self.w_down = rnd(2 * s["inter"], h), rnd(h, s["inter"])
        self.norm_w = (1 + rnd(h, scale=0.1)).to(dtype)
        self.x = rnd(m, h, scale=1.0)
        self.attn = rnd(m, s["heads"] * d, scale=1.0)
        self.act = rnd(m, s["inter"], scale=1.0)
        self.cache = torch.zeros(2, s["blocks"], s["block_size"], s["kv_heads"], d, dtype=dtype, device=device)
        self.slots = torch.arange(m, device=device, dtype=torch.int64) * 3 + 1
        self.positions = torch.arange(m, device=device, dtype=torch.int64) + 100


def ops(layer: Layer, s: dict, rope: RotaryEmbedding, eps: float = 1e-5, config: dict | None = None) -> dict:
    """name -> (fused fn, unfused fn, weight bytes)."""
    L, hq, hkv, d = layer, s["heads"], s["kv_heads"], s["head_dim"]
    cos, sin = rope.cos_cached, rope.sin_cached

    def qkv_fused():
        return gemv.gemv_norm_rope_kv(L.x, L.norm_w, eps, L.w_qkv, None, L.positions, cos, sin, L.cache, L.slots, hq,
                                      config=(config or {}).get("norm_rope_kv"))

    def qkv_unfused():  # the general path's chain: norm, cuBLAS, RoPE + KV write
        h = K.rms_norm_triton(L.x, L.norm_w, eps)
        q, k, v = F.linear(h, L.w_qkv).split([hq * d, hkv * d, hkv * d], dim=-1)
        m = q.shape[0]
        return K.rotary_write_kv_triton(L.positions, q.view(m, hq, d), k.view(m, hkv, d), v.view(m, hkv, d),
                                        cos, sin, L.cache, L.slots)

    def o_fused():
        return gemv.gemv_linear(L.attn, L.w_o, residual=L.x, config=(config or {}).get("linear"))

    def o_unfused():
        return F.linear(L.attn, L.w_o) + L.x

    def gu_fused():
        return gemv.gemv_norm_silu(L.x, L.norm_w, eps, L.w_gu, None, config=(config or {}).get("norm_silu"))

    def gu_unfused():
        return K.silu_and_mul_triton(F.linear(K.rms_norm_triton(L.x, L.norm_w, eps), L.w_gu))

    def down_fused():
        return gemv.gemv_linear(L.act, L.w_down, residual=L.x, config=(config or {}).get("linear"))

    def down_unfused():
        return F.linear(L.act, L.w_down) + L.x

    b = L.w_qkv.element_size()
    return {"qkv+norm+rope+kv": (qkv_fused, qkv_unfused, L.w_qkv.numel() * b),
            "o+residual": (o_fused, o_unfused, L.w_o.numel() * b),
            "gate_up+norm+silu": (gu_fused, gu_unfused, L.w_gu.numel() * b),
            "down+residual": (down_fused, down_unfused, L.w_down.numel() * b)}


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": float((a.float() - b.float()).abs().max()), "bit_equal": float((a == b).float().mean())}


# The sweep's three families: the one-row broadcast path; one row through tl.dot (mma); 16 rows (tl.dot).
SWEEP_FAMILIES = [
    ("row", 1, [dict(hb=hb, block_k=bk, fold=8, num_warps=w, num_stages=1)
                for hb, bk, w in itertools.product([4, 8, 16], [512, 1024], [4, 8])]
     + [dict(hb=hb, block_k=bk, fold=1, num_warps=4, num_stages=1) for hb, bk in ((4, 1024), (8, 512))]
     # Fewer, longer K chunks (the loop is not pipelined: each chunk is a memory latency).
     + [dict(hb=hb, block_k=bk, fold=8, num_warps=w, num_stages=1)
        for hb, bk, w in ((2, 1024, 4), (2, 2048, 4), (2, 2048, 8), (4, 2048, 8), (2, 4096, 8))]),
    ("mma", 1, [dict(mma=True, dot_hb=16, dot_block_k=bk, dot_num_warps=4, dot_num_stages=st)
                for bk, st in itertools.product([128, 256, 512], [2, 3, 4])]),
    ("dot16", 16, [dict(dot_hb=16, dot_block_k=bk, dot_num_warps=4, dot_num_stages=st)
                   for bk, st in itertools.product([128, 256, 512], [2, 3, 4])]),
]
SWEEP_KINDS = {"norm_rope_kv": ["qkv+norm+rope+kv"], "linear": ["o+residual", "down+residual"],
               "norm_silu": ["gate_up+norm+silu"]}
KNOB_KEYS = ("hb", "block_k", "fold", "num_warps", "num_stages", "mma", "dot_hb", "dot_block_k", "dot_num_warps",
             "dot_num_stages")


def sweep(s: dict, rope, device, dtype, gen, copies: int, smoke: bool) -> list[dict]:
    """Time every config of SWEEP_FAMILIES on each kernel kind; one row per (config, op)."""
    families = [(name, min(m, 3), cfgs[:1]) for name, m, cfgs in SWEEP_FAMILIES] if smoke else SWEEP_FAMILIES
    rows = []
    for family, m, cfgs in families:
        layers = [Layer(s, m, device, dtype, gen) for _ in range(copies)]
        for kind, names in SWEEP_KINDS.items():
            for cfg in cfgs:
                per_layer = [ops(layer, s, rope, config={kind: cfg}) for layer in layers]
                for name in names:
                    try:
                        ms = graph_ms([p[name][0] for p in per_layer], device)
                    except Exception as e:  # a config that does not compile (shared memory, registers)
                        print(f"  {family} {kind} {cfg}: {type(e).__name__}")
                        continue
                    nbytes = per_layer[0][name][2]
                    rows.append({"family": family, "rows": m, "kind": kind, "op": name, **cfg, "ms": ms,
                                 "gbps": nbytes / ms / 1e6})
            for name in names:
                best = sorted((r for r in rows if r["op"] == name and r["family"] == family), key=lambda r: r["ms"])[:3]
                for r in best:
                    knobs = {k: r[k] for k in KNOB_KEYS if k in r}
                    print(f"sweep {family:5} {name:20} {knobs}: {r['ms'] * 1e3:6.1f} us {r['gbps']:5.0f} GB/s")
        del layers
    return rows


def pick_configs(rows: list[dict]) -> dict:
    """kind -> config overrides: per kind, the config with the least total time over the kind's ops
    (o_proj and down_proj share one). One row takes the faster of the broadcast and mma families;
    the tl.dot keys come from the 16-row family unless mma wins at one row, whose keys they then are
    (batch 1 is the latency target; 2-16 rows then run on the one-row-tuned tiles)."""
    def best(kind: str, family: str) -> tuple[float, dict] | None:
        totals: dict[tuple, float] = {}
        counts: dict[tuple, int] = {}
        for r in rows:
            if r["kind"] == kind and r["family"] == family:
                key = tuple((k, r[k]) for k in KNOB_KEYS if k in r)
                totals[key] = totals.get(key, 0.0) + r["ms"]
                counts[key] = counts.get(key, 0) + 1
        full = [key for key in totals if counts[key] == len(SWEEP_KINDS[kind])]  # every op compiled
        if not full:
            return None
        key = min(full, key=totals.get)
        return totals[key], dict(key)

    tuned = {}
    for kind in SWEEP_KINDS:
        row, mma, dot16 = best(kind, "row"), best(kind, "mma"), best(kind, "dot16")
        cfg: dict = {}
        if dot16:
            cfg.update(dot16[1])
        if row:
            cfg.update(row[1], mma=False)
        if mma and (row is None or mma[0] < row[0]):
            cfg.update(mma[1])
        tuned[kind] = cfg
    return tuned


def crossover(rows: list[dict]) -> int:
    """The largest measured batch up to which the fused layer (sum over its ops) beats the unfused
    chain at every measured batch size: the engine's ENGINE_FUSED_ROWS."""
    best = 0
    for m in sorted({r["rows"] for r in rows}):
        at = [r for r in rows if r["rows"] == m]
        if sum(r["fused_ms"] for r in at) >= sum(r["unfused_ms"] for r in at):
            break
        best = m
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    s = SHAPE_SMOKE if args.smoke else SHAPE_8B
    copies = 1 if args.smoke else args.copies
    gen = torch.Generator(device=device).manual_seed(0)
    rope = RotaryEmbedding(s["head_dim"], 4096, 500000.0, None).to(device)
    copy_gbps = None
    if device.type == "cuda":
        src = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        copy_gbps = 2 * src.numel() * 2 / (graph_ms([lambda: dst.copy_(src)], device) * 1e-3) / 1e9
        del src, dst
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "copy_gbps": copy_gbps,
              "shape": s, "rows": [], "sweep": []}
    print(f"copy bandwidth {copy_gbps or 0:.0f} GB/s")
    if args.sweep:  # first, so that the fused-vs-unfused rows below run with the tuned configs
        result["sweep"] = sweep(s, rope, device, dtype, gen, copies, args.smoke)
        result["tuned"] = pick_configs(result["sweep"])
        for kind, overrides in result["tuned"].items():
            gemv.GEMV_CONFIGS[kind].update(overrides)
        print(f"tuned: {result['tuned']}")
    for m in [int(r) for r in args.rows.split(",")]:
        layers = [Layer(s, m, device, dtype, gen) for _ in range(copies)]
        per_layer = [ops(layer, s, rope) for layer in layers]
        for name in per_layer[0]:
            fused = graph_ms([p[name][0] for p in per_layer], device)
            unfused = graph_ms([p[name][1] for p in per_layer], device)
            nbytes = per_layer[0][name][2]
            check = compare(per_layer[0][name][0](), per_layer[0][name][1]())
            row = {"rows": m, "op": name, "fused_ms": fused, "unfused_ms": unfused, "weight_bytes": nbytes,
                   "fused_gbps": nbytes / fused / 1e6, "unfused_gbps": nbytes / unfused / 1e6, **check}
            if m == 1 and device.type == "cuda":  # the same kernels without programmatic dependent launch
                no_pdl = {kind: {"pdl": False} for kind in gemv.GEMV_CONFIGS}
                row["fused_no_pdl_ms"] = graph_ms([ops(layer, s, rope, config=no_pdl)[name][0] for layer in layers],
                                                  device)
            result["rows"].append(row)
            print(f"M={m:2} {name:20} fused {fused * 1e3:7.1f} us ({row['fused_gbps']:5.0f} GB/s)  unfused "
                  f"{unfused * 1e3:7.1f} us ({row['unfused_gbps']:5.0f} GB/s)  max|diff| {check['max_abs_diff']:.3g} "
                  f"bit-equal {check['bit_equal']:.1%}"
                  + (f"  no PDL {row['fused_no_pdl_ms'] * 1e3:7.1f} us" if "fused_no_pdl_ms" in row else ""))
        del layers, per_layer
    result["engine_fused_rows"] = crossover(result["rows"])
    if args.sweep and device.type == "cuda":  # PDL per kernel kind, where it won at one row
        for kind, names in SWEEP_KINDS.items():
            at = [r for r in result["rows"] if r["rows"] == 1 and r["op"] in names]
            result["tuned"][kind]["pdl"] = sum(r["fused_ms"] for r in at) < sum(r["fused_no_pdl_ms"] for r in at)
    print(f"fused layers win up to {result['engine_fused_rows']} rows")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv_bench.json").write_text(json.dumps(result, indent=2))
        if args.sweep:  # for TOKENMILL_GEMV_CONFIGS (tokenmill.kernels.gemv.load_tuned_configs)
            tuned = {"device": result["device"], "configs": result["tuned"],
                     "engine_fused_rows": result["engine_fused_rows"]}
            (Path(args.out) / "gemv_configs.json").write_text(json.dumps(tuned, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
