"""Where a decode step's time goes: torch profiler over steady-state decode steps.

For batch sizes (default 1 and 64) on a random-weight model shape, profiles a window of decode
steps and reports: wall time per step, GPU busy time per step (union of kernel intervals), the
idle gap (wall - busy: the host making the GPU wait), and the top kernels with their share of
busy time. Writes a Chrome trace per batch size next to the JSON.

    python benchmarks/profile_decode.py --shape llama-8b --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, write_dummy_model_dir  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402


def busy_time(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_batch(llm: LLM, batch: int, prompt_len: int, steps: int, out: Path, vocab: int) -> dict:
    engine = llm.llm_engine
    rng = random.Random(batch)
    params = SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"p{batch}-{i}", {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(prompt_len)]},
                           params)
    for _ in range(20):  # prefill and settle into pure decode steps
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    prof.export_chrome_trace(str(out / f"decode_trace_b{batch}.json"))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    busy_us = busy_time(intervals)
    window_us = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_name[e.name] += e.time_range.end - e.time_range.start
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"batch": batch, "prompt_len": prompt_len, "steps": steps, "wall_ms_per_step": wall / steps * 1e3,
            "gpu_busy_ms_per_step": busy_us / steps / 1e3, "kernel_window_ms_per_step": window_us / steps / 1e3,
            "idle_fraction_of_wall": 1 - busy_us / 1e6 / wall, "kernels_per_step": len(kernels) / steps,
            "top_kernels": [{"name": n[:90], "ms_per_step": t / steps / 1e3, "share_of_busy": t / busy_us}
                            for n, t in top]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SHAPES[args.shape]
    model_dir = write_dummy_model_dir(Path(tempfile.mkdtemp()) / args.shape, cfg)
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.6,
              max_num_seqs=256, enforce_eager=args.enforce_eager)
    results = [profile_batch(llm, int(b), args.prompt_len, args.steps, out, cfg["vocab_size"])
               for b in args.batches.split(",")]
    (out / "profile_decode.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"batch {r['batch']:4}: wall {r['wall_ms_per_step']:.2f} ms/step, GPU busy {r['gpu_busy_ms_per_step']:.2f} "
              f"ms/step, idle {r['idle_fraction_of_wall']:.0%} of wall, {r['kernels_per_step']:.0f} kernels/step")
        for k in r["top_kernels"][:8]:
            print(f"    {k['ms_per_step']:7.3f} ms  {k['share_of_busy']:5.1%}  {k['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
