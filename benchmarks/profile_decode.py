"""Where a step's time goes: torch profiler over steady-state decode steps and over prefill steps.

For batch sizes (default 1 and 64) on a random-weight model shape, profiles a window of decode
steps and reports: wall time per step, GPU busy time per step (union of kernel intervals), the
idle gap (wall - busy: the host making the GPU wait), and the top kernels with their share of
busy time. With --prefill-requests N it also profiles steps that prefill N prompts of --prompt-len
at once (the throughput job's first steps; N * prompt_len must fit max_num_batched_tokens).
Writes a Chrome trace per run next to the JSON.

    python benchmarks/profile_decode.py --shape llama-8b --batches 1,256 --prefill-requests 16 --out DIR
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


def sync() -> None:
    if torch.cuda.is_available():  # the CPU smoke run (--shape tiny) has nothing to wait for
        torch.cuda.synchronize()


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
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    prof.export_chrome_trace(str(out / f"decode_trace_b{batch}.json"))
    return {"batch": batch, "prompt_len": prompt_len, **summarize(prof, wall, steps)}


def profile_prefill(llm: LLM, num_requests: int, prompt_len: int, steps: int, out: Path, vocab: int) -> dict:
    """`steps` steps, each prefilling `num_requests` fresh prompts in one batch (max_tokens=1)."""
    engine = llm.llm_engine
    rng = random.Random(num_requests)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)

    def one_step(tag: str) -> None:
        for i in range(num_requests):  # fresh random prompts: no prefix-cache hits
            engine.add_request(f"prefill-{tag}-{i}",
                               {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(prompt_len)]}, params)
        while engine.has_unfinished_requests():
            engine.step()

    for w in range(2):
        one_step(f"warm{w}")
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for s in range(steps):
            one_step(str(s))
        sync()
        wall = time.perf_counter() - start
    prof.export_chrome_trace(str(out / f"prefill_trace_{num_requests}x{prompt_len}.json"))
    return {"prefill_requests": num_requests, "prompt_len": prompt_len, **summarize(prof, wall, steps)}


def summarize(prof, wall: float, steps: int) -> dict:
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    busy_us = busy_time(intervals)
    window_us = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_name[e.name] += e.time_range.end - e.time_range.start
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:16]
    return {"steps": steps, "wall_ms_per_step": wall / steps * 1e3,
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
    parser.add_argument("--prefill-requests", type=int, default=0,
                        help="also profile steps prefilling this many prompts of --prompt-len at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--fused-gemv", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's fused batch-1 layers (default: the engine's, on for CUDA)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SHAPES[args.shape]
    model_dir = write_dummy_model_dir(Path(tempfile.mkdtemp()) / args.shape, cfg)
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.6,
              max_num_seqs=256, max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
              fused_gemv=args.fused_gemv)
    results = [profile_batch(llm, int(b), args.prompt_len, args.steps, out, cfg["vocab_size"])
               for b in args.batches.split(",") if b]
    if args.prefill_requests:
        results.append(profile_prefill(llm, args.prefill_requests, args.prompt_len, min(args.steps, 5), out,
                                       cfg["vocab_size"]))
    (out / "profile_decode.json").write_text(json.dumps(results, indent=2))
    for r in results:
        label = f"batch {r['batch']:4}" if "batch" in r else f"prefill {r['prefill_requests']}x{r['prompt_len']}"
        print(f"{label}: wall {r['wall_ms_per_step']:.2f} ms/step, GPU busy {r['gpu_busy_ms_per_step']:.2f} "
              f"ms/step, idle {r['idle_fraction_of_wall']:.0%} of wall, {r['kernels_per_step']:.0f} kernels/step")
        for k in r["top_kernels"]:
            print(f"    {k['ms_per_step']:7.3f} ms  {k['share_of_busy']:5.1%}  {k['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
