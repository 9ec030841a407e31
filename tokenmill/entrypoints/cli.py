"""The `tokenmill` command line."""

from __future__ import annotations

import argparse
import sys


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the number of KV blocks")
    g.add_argument("--cpu-kv-cache-gib", type=float, default=1.0, help="KV cache size on CPU (default: 1 GiB)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step (default: 2048)")
    g.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt in one step")
    g.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"])
    g.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and queue the next step before reading this step's tokens back, so the host "
                        "never makes the device wait (default: on for CUDA, off on CPU)")
    g.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton kernels on CUDA, PyTorch elsewhere (default)")
    g.add_argument("--fused-gemv", action=argparse.BooleanOptionalAction, default=None,
                   help="run batch-1 decode steps through fused projection kernels, 5 per layer (Triton backend; "
                        "default: on for CUDA)")
    g.add_argument("--request-log", default=None, metavar="PATH",
                   help="append one JSON line per finished request (token ids, cache hits, timings) to PATH")
    g.add_argument("--request-log-max-bytes", type=int, default=256 * 2**20, help="rotate the log past this size")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, block_size=args.block_size,
                gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
                cpu_kv_cache_gib=args.cpu_kv_cache_gib, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_chunked_prefill=not args.no_chunked_prefill, load_format=args.load_format,
                enable_prefix_caching=not args.no_prefix_caching, request_log_path=args.request_log,
                enforce_eager=args.enforce_eager, kernel_backend=args.kernel_backend, fused_gemv=args.fused_gemv,
                async_scheduling=args.async_scheduling,
                request_log_max_bytes=args.request_log_max_bytes)


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sample_seed, stop=args.stop or None)
    from tokenmill.models.default_model import default_model_dir

    llm = LLM(args.model or default_model_dir(), seed=args.sample_seed or 0, **engine_kwargs(args))
    output = llm.generate(args.prompt, params)[0].outputs[0]
    sys.stdout.write(args.prompt + output.text + "\n" if args.echo else output.text + "\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.config import EngineConfig
    from tokenmill.models.default_model import default_model_dir
    from tokenmill.server.serve import serve

    config = EngineConfig(model=args.model or default_model_dir(), seed=args.seed, **engine_kwargs(args))
    return serve(config, host=args.host, port=args.port, served_model_name=args.served_model_name,
                 max_queued_requests=args.max_queued_requests, request_timeout=args.request_timeout,
                 graceful_shutdown_timeout=args.graceful_shutdown_timeout)


def cmd_build_tiny_model(args: argparse.Namespace) -> int:
    from tokenmill.testing.tiny_models import build_tiny_model

    path = build_tiny_model(args.out, args.arch, seed=args.seed, dtype=args.dtype)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tokenmill.bench.cli import add_bench_parsers
    from tokenmill.ops.cache_report import add_cache_report_parser
    from tokenmill.ops.tokens_cli import add_tokens_parser
    from tokenmill.ops.tracing import add_observability_args
    from tokenmill.train.default_model import add_train_parser

    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: LLM inference engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a completion for one prompt and print it")
    gen.add_argument("--model", default=None, help="HF model directory (default: the shipped tokenmill-code)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--seed", dest="sample_seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", default=None, help="HF model directory (default: the shipped tokenmill-code)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    srv.add_argument("--max-queued-requests", type=int, default=1024,
                     help="requests beyond max_num_seqs that may wait; more get 503 (default: 1024)")
    srv.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is aborted")
    srv.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM (default: 30)")
    srv.add_argument("--seed", type=int, default=0, help="engine seed (default: 0)")
    add_engine_args(srv)
    add_observability_args(srv)
    srv.set_defaults(func=cmd_serve)

    add_bench_parsers(sub)
    add_cache_report_parser(sub)
    add_tokens_parser(sub)
    add_train_parser(sub)

    tiny = sub.add_parser("build-tiny-model", help="write a tiny random-weight HF model directory (for tests)")
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--arch", default="llama", help="llama, llama3, mistral, qwen2 or qwen3")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32")
    tiny.set_defaults(func=cmd_build_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from tokenmill.errors import TokenmillError

    try:
        return args.func(args)
    except (TokenmillError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
