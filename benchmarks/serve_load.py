"""Start `tokenmill serve` on a model shape with random weights and put a concurrent streaming load on it.

Phase 1: a few requests one at a time (minimum latency). Phase 2: N streaming requests all at once.
Per request: TTFT, mean inter-token gap (per streamed token), end-to-end; totals: output tok/s,
failures. Then /metrics, then SIGTERM and the exit code. (The full workload tool is `tokenmill bench`.)

    python benchmarks/serve_load.py --shape llama-8b --num-requests 128 --input-len 512 --output-len 128 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import LLAMA_8B, QWEN3_0_6B, TINY, write_dummy_model_dir  # noqa: E402

SHAPES = {"llama-8b": LLAMA_8B, "qwen3-0.6b": QWEN3_0_6B, "tiny": TINY}


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens, error = [], 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"]:
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        error = repr(e)
    end = time.perf_counter()
    if error or not stamps or tokens != max_tokens:
        return {"ok": False, "error": error or f"incomplete: {tokens}/{max_tokens} tokens"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ok": True, "ttft": stamps[0] - start, "e2e": end - start, "tokens": tokens,
            "tpot": (end - stamps[0]) / max(1, tokens - 1), "max_gap": max(gaps, default=0.0)}


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    out = {"requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
           "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], "wall_s": wall,
           "output_tok_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0}
    for key in ("ttft", "tpot", "e2e", "max_gap"):
        values = [r[key] for r in ok]
        out[key] = {"mean": sum(values) / len(values) if values else float("nan"), "p50": pct(values, 0.5),
                    "p99": pct(values, 0.99)}
    return out


async def run_load(url: str, prompts: list[list[int]], max_tokens: int, concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, p, max_tokens) for p in prompts))
        else:
            results = [await one_request(client, url, p, max_tokens) for p in prompts]
        return summarize(list(results), time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--sequential-requests", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--out", default=".")
    parser.add_argument("serve_args", nargs="*", help="extra flags for tokenmill serve (after --)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    model_dir = write_dummy_model_dir(tmp / args.shape, SHAPES[args.shape])
    url = f"http://127.0.0.1:{args.port}"
    log_path = Path(args.out) / "serve_load_server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", "--model", str(model_dir),
                               "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096",
                               "--served-model-name", "bench", "--port", str(args.port),
                               "--max-num-seqs", str(max(256, args.num_requests)), *args.serve_args],
                              stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    result: dict = {"shape": args.shape, "num_requests": args.num_requests, "input_len": args.input_len,
                    "output_len": args.output_len}
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 600:
                raise RuntimeError("server not ready in 600 s")
            time.sleep(0.5)
        result["startup_s"] = time.perf_counter() - started
        rng = random.Random(0)
        vocab = SHAPES[args.shape]["vocab_size"]
        prompt = lambda: [rng.randrange(10, vocab) for _ in range(args.input_len)]  # noqa: E731
        asyncio.run(run_load(url, [prompt()], 8, concurrent=False))  # warm-up
        result["sequential"] = asyncio.run(run_load(url, [prompt() for _ in range(args.sequential_requests)],
                                                    args.output_len, concurrent=False))
        result["concurrent"] = asyncio.run(run_load(url, [prompt() for _ in range(args.num_requests)],
                                                    args.output_len, concurrent=True))
        metrics = httpx.get(url + "/metrics").text
        result["metrics"] = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                             if line.startswith(("tokenmill:num_preemptions_total", "tokenmill:kv_cache_usage_perc",
                                                 "tokenmill:generation_tokens_total",
                                                 "tokenmill:num_requests_running"))}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            result["exit_code_after_sigterm"] = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            result["exit_code_after_sigterm"] = "killed after 60 s"
        log.close()
    out = Path(args.out)
    (out / "serve_load.json").write_text(json.dumps(result, indent=2))
    print(f"\nserve_load {args.shape}: start-up {result['startup_s']:.1f} s, exit after SIGTERM "
          f"{result['exit_code_after_sigterm']}")
    for phase in ("sequential", "concurrent"):
        r = result[phase]
        print(f"{phase:10} {r['completed']}/{r['requests']} ok, {r['output_tok_s']:.0f} out tok/s, "
              f"TTFT p50 {r['ttft']['p50'] * 1e3:.0f} ms p99 {r['ttft']['p99'] * 1e3:.0f} ms, "
              f"TPOT mean {r['tpot']['mean'] * 1e3:.1f} ms p99 {r['tpot']['p99'] * 1e3:.1f} ms, "
              f"max gap p99 {r['max_gap']['p99'] * 1e3:.0f} ms, errors {r['errors']}")
    print(f"metrics: {result['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
