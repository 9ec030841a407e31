"""GPU correctness check for the engine core (issue 2), one run on a CUDA machine.

1. Tiny models of every architecture in bf16: tokenmill's greedy tokens vs HF transformers' (same
   weights, bf16, CUDA, full forward each step) for 24 tokens on several prompts; logprob gaps.
2. A random-weight Llama-3.1-8B-shaped model (load_format=dummy, built on the GPU from a config):
   64 requests run to completion; start-up time, KV capacity, wall time.

    python benchmarks/gpu_check.py --out results/   # prints a table, writes gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.testing.tiny_models import ARCHITECTURES, build_tiny_model  # noqa: E402

from shapes import LLAMA_8B, write_dummy_model_dir  # noqa: E402

PROMPTS = [
    "Hello world",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ünïcödé — καλημέρα 你好 🎉",
    "Once upon a time there was a little engine that served tokens.",
]
def hf_greedy(model, prompt_ids, steps, device):
    ids, logprobs, margins = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids], device=device)).logits[0, -1].float()
            top2 = logits.topk(2).values
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            margins.append(float(top2[0] - top2[1]))
            ids.append(token)
    return ids[len(prompt_ids):], logprobs, margins


def hf_teacher_forced_gap(model, prompt_ids, output_ids, device) -> float:
    """Largest (HF's max logit - HF's logit of the token we chose) over our output positions: 0 when
    every choice is HF's argmax; one bf16 rounding step when we broke a near-tie the other way."""
    ids = torch.tensor([list(prompt_ids) + list(output_ids[:-1])], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:].float()
    chosen = logits.gather(1, torch.tensor(output_ids, device=device)[:, None]).squeeze(1)
    return float((logits.max(dim=-1).values - chosen).max())


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens of a and b agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tiny_models(root: Path, steps: int, device: str, fused_gemv: bool | None = None) -> list[dict]:
    """bf16 greedy tokens against HF per prompt, in a batch and alone (batch-1 decode steps: the
    fused layers' one-row path where fused_gemv is on, the default on CUDA)."""
    from transformers import AutoModelForCausalLM

    rows = []
    for arch in ARCHITECTURES:
        model_dir = build_tiny_model(root / arch, arch, seed=1)
        llm = LLM(str(model_dir), dtype="bfloat16", device=device, num_kv_blocks=256, max_num_batched_tokens=32,
                  fused_gemv=fused_gemv)
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=0)
        outs = llm.generate(PROMPTS, params)
        alone = [llm.generate([prompt], params)[0].outputs[0].token_ids for prompt in PROMPTS]
        # The same engine with steps run one at a time (no async scheduling): identical tokens.
        sync = LLM(str(model_dir), dtype="bfloat16", device=device, num_kv_blocks=256, max_num_batched_tokens=32,
                   async_scheduling=False, fused_gemv=fused_gemv)
        sync_ids = [o.outputs[0].token_ids for o in sync.generate(PROMPTS, params)]
        # Sampled rows (seeded draws, top-p, min_tokens bans, logprobs copied back without a sync).
        sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=steps, min_tokens=4, logprobs=2)
        sampled_sync = [o.outputs[0].token_ids for o in sync.generate(PROMPTS, sampled)]
        sampled_async = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sampled)]
        del sync
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
        for prompt_index, out in enumerate(outs):
            ref_ids, ref_lp, margins = hf_greedy(hf, out.prompt_token_ids, steps, device)
            got = out.outputs[0]
            same = matching_prefix(got.token_ids, ref_ids)
            lp_diff = max((abs(got.logprobs[i][t].logprob - ref_lp[i]) for i, t in enumerate(got.token_ids[:same])),
                          default=0.0)
            gap = hf_teacher_forced_gap(hf, out.prompt_token_ids, got.token_ids, device)
            same_alone = matching_prefix(alone[prompt_index], ref_ids)
            rows.append(dict(arch=arch, prompt=prompt_index, matching_tokens=same, steps=steps,
                             alone_matching_tokens=same_alone,
                             alone_margin_at_divergence=margins[same_alone] if same_alone < steps else None,
                             async_scheduling=llm.llm_engine.core.async_scheduling,
                             async_equals_sync=got.token_ids == sync_ids[prompt_index],
                             sampled_async_equals_sync=sampled_async[prompt_index] == sampled_sync[prompt_index],
                             max_logprob_diff=lp_diff, teacher_forced_max_gap=gap,
                             hf_margin_at_divergence=margins[same] if same < steps else None))
        del llm, hf
    return rows


def check_8b(root: Path, num_requests: int, max_tokens: int) -> dict:
    model_dir = write_dummy_model_dir(root / "llama-8b-shape", LLAMA_8B)
    start = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096,
              max_num_seqs=num_requests)
    startup = time.perf_counter() - start
    core = llm.llm_engine.core
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 128000) for _ in range(rng.randrange(128, 513))] for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    completed = sum(1 for o in outs if o.finished and len(o.outputs[0].token_ids) == max_tokens)
    # Same request alone must give the same greedy tokens as inside the batch (bf16: report agreement).
    alone = llm.generate([prompts[0]], params)[0].outputs[0].token_ids
    agree = matching_prefix(alone, outs[0].outputs[0].token_ids)
    # Baseline for the fast-path issue: batch-1 decode speed of this (PyTorch, no graphs) path.
    single = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, detokenize=False)
    llm.generate([prompts[1][:128]], single)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate([prompts[1][:128]], single)
    torch.cuda.synchronize()
    batch1_tok_s = 128 / (time.perf_counter() - t0)
    return dict(num_requests=num_requests, completed=completed, max_tokens=max_tokens,
                prompt_tokens=sum(map(len, prompts)), output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
                wall_s=wall, output_tok_s=sum(len(o.outputs[0].token_ids) for o in outs) / wall,
                startup_s=startup, kv_blocks=core.num_kv_blocks, kv_tokens=core.kv_capacity_tokens,
                preemptions=core.total_preemptions, first_request_alone_vs_batch_agreeing_tokens=agree,
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, batch1_tok_s=batch1_tok_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="directory for gpu_check.json")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--fused-gemv", action=argparse.BooleanOptionalAction, default=None,
                        help="the fused batch-1 layers (default: the engine's, on for CUDA)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = dict(device=name, torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    import transformers

    result["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        result["fused_gemv"] = args.fused_gemv
        result["tiny"] = check_tiny_models(Path(tmp), args.steps, args.device, args.fused_gemv)
        if not args.skip_8b:
            result["llama_8b_shape"] = check_8b(Path(tmp), args.requests, args.max_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))

    print(f"\n{result['device']}  torch {result['torch']}  transformers {result['transformers']}  {result['date']}")
    print(f"{'arch':8} {'prompt':>6} {'match':>9} {'max|dlogprob|':>14} {'HF top-2 gap at divergence':>27} "
          f"{'teacher-forced gap':>19} {'alone':>9} {'gap':>7}")
    for row in result["tiny"]:
        gap = "" if row["hf_margin_at_divergence"] is None else f"{row['hf_margin_at_divergence']:.4f}"
        gap_alone = "" if row["alone_margin_at_divergence"] is None else f"{row['alone_margin_at_divergence']:.4f}"
        print(f"{row['arch']:8} {row['prompt']:>6} {row['matching_tokens']:>4}/{row['steps']:<4} "
              f"{row['max_logprob_diff']:>14.2e} {gap:>27} {row['teacher_forced_max_gap']:>19.4f} "
              f"{row['alone_matching_tokens']:>4}/{row['steps']:<4} {gap_alone:>7}")
    rows = result["tiny"]
    print(f"async scheduling on: {all(r['async_scheduling'] for r in rows)}; tokens identical to synchronous "
          f"steps: {sum(r['async_equals_sync'] for r in rows)}/{len(rows)} prompts greedy, "
          f"{sum(r['sampled_async_equals_sync'] for r in rows)}/{len(rows)} seeded sampling with logprobs")
    if "llama_8b_shape" in result:
        r = result["llama_8b_shape"]
        print(f"8B shape: {r['completed']}/{r['num_requests']} requests completed, {r['output_tokens']} tokens "
              f"in {r['wall_s']:.1f} s ({r['output_tok_s']:.0f} tok/s, first-use kernel compilation included), start-up {r['startup_s']:.1f} s, "
              f"KV {r['kv_tokens']} tokens, preemptions {r['preemptions']}, "
              f"alone-vs-batch agreement {r['first_request_alone_vs_batch_agreeing_tokens']}/{r['max_tokens']}, "
              f"peak {r['peak_memory_gib']:.1f} GiB, batch-1 decode {r['batch1_tok_s']:.1f} tok/s (128 in, 128 out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
