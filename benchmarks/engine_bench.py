"""Offline engine benchmark on one GPU: latency and throughput next to the roofline and HF transformers.

  latency:    batch 1, greedy, prompt 128 -> 256 new tokens (and prompt 8192 -> 256)
  throughput: N requests (default 256) x (512 in, 256 out), ignore_eos, all submitted at once
  roofline:   measured copy bandwidth and bf16 matmul rate; decode bound = bytes (weights + KV read)
              per step / bandwidth; job bound = prefill FLOPs / matmul rate + decode bytes / bandwidth
  transformers (same weights): generate with a static cache at batch 1; generate_batch
              (attn_implementation="paged|sdpa") for throughput, on --hf-requests requests

    python benchmarks/engine_bench.py --shape llama-8b --out DIR
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, write_dummy_model_dir  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.kernels.pdl import supports_pdl  # noqa: E402

PA = importlib.import_module("tokenmill.kernels.paged_attention")  # the package's `paged_attention` is a function


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_ceilings(device: str) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul's rate."""
    if device != "cuda":
        return {"copy_bytes_per_s": 1e10, "matmul_flops_per_s": 1e11}
    src = torch.randn(2**29 // 2, dtype=torch.bfloat16, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        dst.copy_(src)
    sync()
    copy = 2 * src.numel() * 2 * reps / (time.perf_counter() - start)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    flops = 2 * 8192**3 * 10 / (time.perf_counter() - start)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy, "matmul_flops_per_s": flops}


def model_numbers(cfg: dict) -> dict:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    per_layer = h * (heads * hd) + 2 * h * (kv_heads * hd) + (heads * hd) * h + 3 * h * inter
    matmul_params = layers * per_layer + vocab * h  # the lm_head is read every step; embeddings are a gather
    return {"matmul_params": matmul_params, "layers": layers, "kv_bytes_per_token": 2 * layers * kv_heads * hd * 2,
            "heads": heads, "head_dim": hd}


def decode_step_bytes(m: dict, context_tokens: int) -> float:
    return 2 * m["matmul_params"] + m["kv_bytes_per_token"] * context_tokens


def prefill_flops(m: dict, prompt_len: int) -> float:
    attention = 2 * 2 * m["layers"] * m["heads"] * m["head_dim"] * prompt_len * prompt_len / 2  # causal
    return 2 * m["matmul_params"] * prompt_len + attention


def timed_single(llm: LLM, prompt: list[int], new_tokens: int) -> dict:
    """Batch 1: TTFT (prefill + first token) and decode tok/s over the rest, stepping the engine."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    sync()
    start = time.perf_counter()
    engine.add_request("bench", {"prompt_token_ids": prompt}, params)
    first = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if first is None and outputs:
            first = time.perf_counter()
    sync()
    end = time.perf_counter()
    return {"prompt_len": len(prompt), "new_tokens": new_tokens, "ttft_s": first - start, "total_s": end - start,
            "decode_tok_s": (new_tokens - 1) / (end - first), "end_to_end_tok_s": new_tokens / (end - start)}


def record_steps(core) -> dict:
    """Wrap core.step to record each step's (prefill tokens, decode tokens) and, in order, the device
    times and the idle gaps before them that the step timer reports (a step's figures may arrive
    with the next call). Restore with `del core.step`."""
    record = {"kinds": [], "device": [], "idle": []}
    original = core.step

    def step():
        out = original()
        record["kinds"].append((out.stats.num_prefill_tokens, out.stats.num_decode_tokens))
        record["device"] += out.stats.step_device_times
        record["idle"] += out.stats.step_idle_times
        return out

    core.step = step
    return record


class GcPauses:
    """Python's garbage collections while active (gc.callbacks): count and seconds per generation,
    and the longest, so a stall between steps can be told apart from device or scheduler time."""

    def __init__(self):
        self.count, self.seconds, self.longest_s, self._start = [0, 0, 0], [0.0, 0.0, 0.0], 0.0, 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            took = time.perf_counter() - self._start
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += took
            self.longest_s = max(self.longest_s, took)

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {"collections_per_generation": self.count, "seconds_per_generation": self.seconds,
                "longest_ms": self.longest_s * 1e3}


def step_breakdown(record: dict, wall: float) -> dict:
    """Device and idle time of the throughput job by step kind. idle[i] is the gap before step
    i + 1 (the first step has none); what neither covers is host time before the first step and
    after the last one."""
    kinds, device, idle = record["kinds"], record["device"], record["idle"]
    with_prefill = [bool(p) for p, _ in kinds]
    idle_before = [0.0] + idle
    gaps = sorted(((g, i) for i, g in enumerate(idle_before)), reverse=True)[:5]
    return {
        "steps": len(kinds), "steps_with_prefill": sum(with_prefill), "device_s": sum(device),
        "device_s_steps_with_prefill": sum(t for p, t in zip(with_prefill, device) if p),
        "device_s_decode_steps": sum(t for p, t in zip(with_prefill, device) if not p),
        "idle_s": sum(idle),
        "idle_s_before_steps_with_prefill": sum(g for p, g in zip(with_prefill, idle_before) if p),
        "idle_s_before_decode_steps": sum(g for p, g in zip(with_prefill, idle_before) if not p),
        "outside_steps_s": wall - sum(device) - sum(idle),
        "largest_gaps": [{"step": i, "idle_ms": g * 1e3, "step_prefill_tokens": kinds[i][0],
                          "step_decode_tokens": kinds[i][1]} for g, i in gaps if i < len(kinds)],
        "mean_decode_batch": sum(d for p, d in kinds if not p) / max(1, sum(1 for p, _ in kinds if not p))}


def hf_from_engine(llm: LLM, cfg: dict, attn: str):
    """An HF LlamaForCausalLM holding exactly the engine's weights (fused tensors split back)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ours = llm.llm_engine.core.runner.model
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.bfloat16)
    hf = hf.to_empty(device="cuda")
    q = ours.config.num_heads * ours.config.head_dim
    kv = ours.config.num_kv_heads * ours.config.head_dim
    state = {}
    for name, tensor in ours.state_dict().items():
        if "qkv_proj" in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv])):
                state[name.replace("qkv_proj", part)] = chunk
        elif "gate_up_proj" in name:
            for part, chunk in zip(("gate_proj", "up_proj"), tensor.chunk(2)):
                state[name.replace("gate_up_proj", part)] = chunk
        else:
            state[name] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    hf.model.rotary_emb.__init__(config, device="cuda")  # buffers were on meta
    return hf.eval()


def hf_latency(hf, prompt: list[int], new_tokens: int) -> dict:
    ids = torch.tensor([prompt], device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static")
    # Warm-up with the same lengths: the static cache's size (prompt + new tokens) is part of what
    # generate compiles for, so a shorter warm-up left the compilation inside the timed call.
    hf.generate(ids, **kwargs)
    sync()
    start = time.perf_counter()
    hf.generate(ids, **kwargs)
    sync()
    return {"tok_s": new_tokens / (time.perf_counter() - start)}


def hf_throughput(hf, prompts: list[list[int]], new_tokens: int) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    sync()
    start = time.perf_counter()
    outputs = hf.generate_batch(inputs=prompts, generation_config=config)
    sync()
    wall = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in outputs.values())
    return {"requests": len(prompts), "output_tokens": produced, "wall_s": wall, "output_tok_s": produced / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--long-prompt", type=int, default=8192)
    parser.add_argument("--hf-requests", type=int, default=64, help="requests for HF generate_batch (0: skip)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the engine's (on for CUDA)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--fused-gemv", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's fused batch-1 layers (default: the engine's, on for CUDA)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--decode-partitions", choices=["fixed", "dynamic"], default=None,
                        help="split-K partitions of decode attention (default: the kernel's, paged_attention.DECODE_PARTITIONS)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    cfg = SHAPES[args.shape]
    if args.decode_partitions:
        PA.DECODE_PARTITIONS = args.decode_partitions
    model_dir = write_dummy_model_dir(Path(tempfile.mkdtemp()) / args.shape, cfg)
    result: dict = {"shape": args.shape, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["ceilings"] = ceilings = measure_ceilings(args.device)
    m = model_numbers(cfg)

    start = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", device=args.device,
              max_model_len=args.long_prompt + args.output_len + 16, gpu_memory_utilization=0.6,
              max_num_seqs=args.requests, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling, fused_gemv=args.fused_gemv)
    core = llm.llm_engine.core
    result["startup_s"] = time.perf_counter() - start
    result["cuda_graph_capture_s"] = core.cuda_graph_capture_seconds
    result["engine"] = {"async_scheduling": core.async_scheduling,
                        "fused_gemv": core.config.resolve_fused_gemv(core.device),
                        "decode_partitions": PA.DECODE_PARTITIONS, "pdl": supports_pdl(core.device),
                        "enforce_eager": args.enforce_eager}
    rng = random.Random(0)
    vocab = cfg["vocab_size"]
    prompt = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731

    # Warm-up of every kernel variant the timed runs use (Triton compiles on first use: on a fresh
    # machine that is seconds, and it must not land inside a timed run): short and long prefills,
    # decode, and a small batch of the throughput shape with mixed prefill + decode steps.
    timed_single(llm, prompt(128), 16)
    if not args.skip_latency:
        timed_single(llm, prompt(args.long_prompt), 4)
    # The whole batch: a first decode step at the full batch size compiled a kernel variant inside
    # the timed job (a 296 ms gap on a fresh H200, 2026-12-01).
    llm.generate([prompt(args.input_len) for _ in range(args.requests)],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False))
    latency = []
    for prompt_len in () if args.skip_latency else (128, args.long_prompt):
        run = timed_single(llm, prompt(prompt_len), args.output_len)
        mid_context = prompt_len + args.output_len // 2
        run["roofline_decode_tok_s"] = ceilings["copy_bytes_per_s"] / decode_step_bytes(m, mid_context)
        run["fraction_of_roofline"] = run["decode_tok_s"] / run["roofline_decode_tok_s"]
        latency.append(run)
    result["latency"] = latency

    prompts = [prompt(args.input_len) for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    steps = record_steps(core)
    sync()
    with GcPauses() as gc_pauses:
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync()
        wall = time.perf_counter() - start
    del core.step  # stop recording: the class's step again
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prefill_bound = args.requests * prefill_flops(m, args.input_len) / ceilings["matmul_flops_per_s"]
    decode_bytes = sum(decode_step_bytes(m, args.requests * (args.input_len + step))
                       for step in range(args.output_len))
    decode_bound = decode_bytes / ceilings["copy_bytes_per_s"]
    # Where the job's time went: device time of the steps that carried prefill tokens and of the
    # pure-decode steps, and the device's idle gaps before each kind (the device waiting for the host).
    device_times, idle_times = core.runner.step_timer.collect()  # the last step completes after the loop
    steps["device"] += device_times
    steps["idle"] += idle_times
    result["throughput_steps"] = dict(step_breakdown(steps, wall), gc=gc_pauses.summary())
    result["throughput"] = {
        "requests": args.requests, "input_len": args.input_len, "output_len": args.output_len, "wall_s": wall,
        "output_tok_s": out_tokens / wall, "total_tok_s": (out_tokens + args.requests * args.input_len) / wall,
        "roofline_s": prefill_bound + decode_bound, "roofline_prefill_s": prefill_bound,
        "roofline_decode_s": decode_bound, "fraction_of_roofline": (prefill_bound + decode_bound) / wall,
        "preemptions": core.total_preemptions, "max_num_batched_tokens": args.max_num_batched_tokens}

    if not args.skip_hf and args.device == "cuda":
        try:
            hf = hf_from_engine(llm, cfg, "sdpa")
            del llm, core
            gc.collect()
            torch.cuda.empty_cache()
            result["hf_latency_128"] = hf_latency(hf, prompts[0][:128], args.output_len)
            if args.hf_requests:
                hf.set_attn_implementation("paged|sdpa")
                result["hf_throughput"] = hf_throughput(hf, prompts[:args.hf_requests], args.output_len)
        except Exception as e:  # report, keep our numbers
            result["hf_error"] = f"{type(e).__name__}: {e}"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"engine_bench_{args.shape}.json").write_text(json.dumps(result, indent=2))
    c = result["ceilings"]
    print(f"\n{result['device']} {args.shape}: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; start-up {result['startup_s']:.1f} s "
          f"(graphs {result['cuda_graph_capture_s']})")
    for run in latency:
        print(f"latency  prompt {run['prompt_len']:5} -> {run['new_tokens']}: TTFT {run['ttft_s'] * 1e3:.0f} ms, "
              f"decode {run['decode_tok_s']:.1f} tok/s = {run['fraction_of_roofline']:.0%} of roofline "
              f"{run['roofline_decode_tok_s']:.0f}")
    t = result["throughput"]
    print(f"throughput {t['requests']} x ({t['input_len']} in, {t['output_len']} out): {t['output_tok_s']:.0f} out tok/s, "
          f"{t['total_tok_s']:.0f} total tok/s, {t['wall_s']:.1f} s vs roofline {t['roofline_s']:.1f} s "
          f"({t['fraction_of_roofline']:.0%})")
    st = result["throughput_steps"]
    print(f"  steps: {st['steps']} ({st['steps_with_prefill']} with prefill); device time {st['device_s']:.2f} s of "
          f"{t['wall_s']:.2f} s wall: steps with prefill {st['device_s_steps_with_prefill']:.2f} s (roofline "
          f"{t['roofline_prefill_s']:.2f}), decode steps {st['device_s_decode_steps']:.2f} s (roofline "
          f"{t['roofline_decode_s']:.2f}, mean batch {st['mean_decode_batch']:.0f})")
    print(f"  device idle {st['idle_s']:.3f} s between steps ({st['idle_s_before_steps_with_prefill']:.3f} before "
          f"steps with prefill, {st['idle_s_before_decode_steps']:.3f} before decode steps), "
          f"{st['outside_steps_s']:.3f} s before the first / after the last step; largest gaps: "
          + ", ".join(f"{g['idle_ms']:.1f} ms before step {g['step']} ({g['step_prefill_tokens']}+"
                      f"{g['step_decode_tokens']} tokens)" for g in st["largest_gaps"][:3]))
    print(f"  garbage collections (gen 0/1/2): {st['gc']['collections_per_generation']}, "
          f"{sum(st['gc']['seconds_per_generation']) * 1e3:.1f} ms in all, longest {st['gc']['longest_ms']:.1f} ms")
    for key in ("hf_latency_128", "hf_throughput", "hf_error"):
        if key in result:
            print(f"{key}: {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
