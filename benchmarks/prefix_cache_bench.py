"""Prefix caching on a scripted multi-turn agent workload, with and without caching.

Conversations share a long system prompt (tool definitions); each turn resends the whole history
(system + earlier user messages + the model's exact earlier outputs, as token ids) plus a new user
message. A few conversations run at a time, their turns one after another. Run twice on fresh
servers (caching on, then --no-prefix-caching); report TTFT p50/p99 and prefill tokens computed.
The cached run writes a request log; `tokenmill cache-report` then compares the achieved hit rate
with LRU and Belady at the same KV capacity.

`--workload agent` replaces the scripted conversations with `tokenmill bench`'s agent archetype
(shared tool-definition prefixes in groups, context growing over 3-8 turns, long outputs), scaled by
`--length-scale`, `--bench-requests` requests from `--concurrency` closed-loop users.

    python benchmarks/prefix_cache_bench.py --shape llama-8b --out DIR
    python benchmarks/prefix_cache_bench.py --workload agent --bench-requests 64 --concurrency 8 \
        --kv-blocks 1024 --max-model-len 8192 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import one_request  # noqa: E402
from shapes import SHAPES, write_dummy_model_dir  # noqa: E402

from tokenmill.testing.server_process import ServerProcess  # noqa: E402


async def run_workload(url: str, args, vocab: int) -> list[dict]:
    rng = random.Random(0)
    system = [rng.randrange(10, vocab) for _ in range(args.system_len)]
    conversations = [[] for _ in range(args.conversations)]
    results: list[dict] = []
    gate = asyncio.Semaphore(args.concurrency)

    async def converse(index: int, history: list[int]):
        own = random.Random(index + 1)  # the same user messages in every run, whatever the interleaving
        async with gate:
            for _ in range(args.turns):
                user = [own.randrange(10, vocab) for _ in range(args.user_len)]
                prompt = system + history + user
                result = await one_request(client, url, prompt, args.output_len)
                result["prompt_tokens"] = len(prompt)
                results.append(result)
                if not result["ok"]:
                    return
                history += user + result["token_ids"]

    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(converse(i, h) for i, h in enumerate(conversations)))
    return results


async def run_agent_archetype(url: str, args) -> list[dict]:
    """The agent archetype through tokenmill bench, as records in run_workload's shape."""
    from tokenmill.bench.client import Target
    from tokenmill.bench.runner import Bench
    from tokenmill.bench.workload import archetype

    workload = archetype("agent").scaled(args.length_scale)
    async with Bench(Target(url), workload, seed=0, warmup=0) as bench:
        run = await bench.concurrency(args.concurrency, n=args.bench_requests)
    return [{"ok": r.ok, "ttft": r.ttft, "prompt_tokens": r.input_tokens, "cached_tokens": r.cached_tokens or 0,
             "tpot": r.tpot or 0.0} for r in run.records]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_once(model_dir: Path, args, caching: bool, out: Path) -> dict:
    extra = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
             "--num-kv-blocks", str(args.kv_blocks), *args.serve_args]
    log_path = out / "prefix_cache_requests.jsonl"
    if caching:
        log_path.unlink(missing_ok=True)
        extra += ["--request-log", str(log_path)]
    else:
        extra += ["--no-prefix-caching"]
    name = "cached" if caching else "uncached"
    server = ServerProcess(model_dir, *extra, name="bench", startup_timeout=600,
                           log_path=out / f"prefix_cache_server_{name}.log")
    try:
        results = asyncio.run(run_agent_archetype(server.url, args) if args.workload == "agent" else
                              run_workload(server.url, args, SHAPES[args.shape]["vocab_size"]))
        computed = server.metric("prefill_computed_tokens_total")
        hits = server.metric("prefix_cache_hits_total")
        queries = server.metric("prefix_cache_queries_total")
        preemptions = server.metric("num_preemptions_total")
    finally:
        server.stop()
    ok = [r for r in results if r["ok"]]
    ttfts = [r["ttft"] for r in ok]
    return {"caching": caching, "requests": len(results), "completed": len(ok),
            "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "prefill_computed_tokens": computed,
            "prefix_cache_queries": queries, "prefix_cache_hits": hits, "preemptions": preemptions,
            "cached_tokens_reported": sum(r["cached_tokens"] for r in ok),
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99),
            "tpot_mean": sum(r["tpot"] for r in ok) / max(1, len(ok)), "request_log": str(log_path)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8, help="conversations in flight at once")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-len", type=int, default=2048)
    parser.add_argument("--user-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-blocks", type=int, default=1024, help="KV capacity in 16-token blocks (both runs)")
    parser.add_argument("--workload", choices=["scripted", "agent"], default="scripted",
                        help="agent: tokenmill bench's agent archetype instead of the scripted conversations")
    parser.add_argument("--bench-requests", type=int, default=64, help="agent workload: requests per run")
    parser.add_argument("--length-scale", type=float, default=1.0, help="agent workload: token-length scale")
    parser.add_argument("--skip-uncached", action="store_true", help="only the run with caching (hit rates)")
    parser.add_argument("--out", default=".")
    parser.add_argument("serve_args", nargs="*", help="extra flags for tokenmill serve (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_dummy_model_dir(Path(tempfile.mkdtemp()) / args.shape, SHAPES[args.shape])
    cached = run_once(model_dir, args, True, out)
    uncached = None if args.skip_uncached else run_once(model_dir, args, False, out)
    report = subprocess.run([sys.executable, "-m", "tokenmill", "cache-report", cached["request_log"],
                             "--capacity-tokens", str(args.kv_blocks * 16)], capture_output=True, text=True)
    result = {"workload": {k: getattr(args, k) for k in ("workload", "shape", "conversations", "concurrency", "turns",
                                                          "system_len", "user_len", "output_len", "kv_blocks",
                                                          "bench_requests", "length_scale", "max_model_len")},
              "cached": cached, "uncached": uncached, "cache_report": report.stdout + report.stderr,
              "ttft_p50_speedup": uncached["ttft_p50"] / cached["ttft_p50"] if uncached and cached["ttft_p50"]
              else None}
    (out / "prefix_cache_bench.json").write_text(json.dumps(result, indent=2))
    for run in (cached, uncached) if uncached else (cached,):
        print(f"caching={run['caching']!s:5} {run['completed']}/{run['requests']} ok, TTFT p50 "
              f"{run['ttft_p50'] * 1e3:.0f} ms p99 {run['ttft_p99'] * 1e3:.0f} ms, prefill computed "
              f"{run['prefill_computed_tokens']:.0f} of {run['prompt_tokens']} prompt tokens, "
              f"TPOT {run['tpot_mean'] * 1e3:.1f} ms, preemptions {run['preemptions']:.0f}")
    if uncached:
        print(f"TTFT p50 speed-up with caching: {result['ttft_p50_speedup']:.2f}x")
    print(report.stdout + report.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
