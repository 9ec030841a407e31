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
import random
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import run_load  # noqa: E402
from shapes import SHAPES, write_dummy_model_dir  # noqa: E402

from tokenmill.testing.server_process import ServerProcess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--sequential-requests", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", default=".")
    parser.add_argument("serve_args", nargs="*", help="extra flags for tokenmill serve (after --)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_dummy_model_dir(Path(tempfile.mkdtemp()) / args.shape, SHAPES[args.shape])
    server = ServerProcess(model_dir, "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096",
                           "--max-num-seqs", str(max(256, args.num_requests)), *args.serve_args,
                           name="bench", startup_timeout=600, log_path=out / "serve_load_server.log")
    result: dict = {"shape": args.shape, "num_requests": args.num_requests, "input_len": args.input_len,
                    "output_len": args.output_len, "startup_s": server.startup_s}
    try:
        rng = random.Random(0)
        vocab = SHAPES[args.shape]["vocab_size"]
        prompt = lambda: [rng.randrange(10, vocab) for _ in range(args.input_len)]  # noqa: E731
        asyncio.run(run_load(server.url, [prompt()], 8, concurrent=False))  # warm-up
        result["sequential"] = asyncio.run(run_load(server.url, [prompt() for _ in range(args.sequential_requests)],
                                                    args.output_len, concurrent=False))
        result["concurrent"] = asyncio.run(run_load(server.url, [prompt() for _ in range(args.num_requests)],
                                                    args.output_len, concurrent=True))
        result["metrics"] = {name: server.metric(name) for name in (
            "num_preemptions_total", "kv_cache_usage_perc", "generation_tokens_total", "num_requests_running")}
    finally:
        result["exit_code_after_sigterm"] = server.stop(signal.SIGTERM, timeout=60)
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
