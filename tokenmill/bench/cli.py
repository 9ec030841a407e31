"""`tokenmill bench` and `tokenmill plan`. Register with ``add_bench_parsers(subparsers)``.

Flags follow ``vllm bench serve`` where they overlap (--base-url, --model, --request-rate, --burstiness,
--max-concurrency, --num-prompts, --goodput, --save-result, --result-dir, --result-filename).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "sequential": "one request at a time: the minimum latency",
    "burst": "every request at once (capped by --max-concurrency, default min(N, 512)): the maximum throughput",
    "rate": "the workload's arrival process at R requests/s (open loop)",
    "concurrency": "C closed-loop users, each sending its next request when the last one ends",
    "sweep": "sequential, burst, then --num-rates rates evenly between them; stops once saturated or failing",
    "recipe": "the seed's one-replica recipe: sweep, highest rate within the SLOs, token timing, capacity plan",
}
GOODPUT_KEYS = ("ttft", "tpot", "itl", "ttlt", "e2el")


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="OpenAI-compatible server (tokenmill, vLLM, SGLang); default http://127.0.0.1:8000")
    t.add_argument("--model", default=None, help="model name to send (default: the first in /v1/models)")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    t.add_argument("--engine-model", default=None, metavar="PATH",
                   help="start a local `tokenmill serve --model PATH` (or 'default': the built-in model) and "
                        "benchmark it instead of --base-url")
    t.add_argument("--engine-args", default="", metavar="ARGS",
                   help="extra flags for that server, e.g. \"--max-num-seqs 64 --num-kv-blocks 512\"")
    t.add_argument("--in-process", action="store_true",
                   help="with --engine-model: drive the engine in this process (AsyncLLM, the engine core in its "
                        "own process) with no HTTP server: the engine's latency without HTTP/SSE")
    t.add_argument("--api", choices=["completions", "chat"], default=None, help="override the workload's API")
    t.add_argument("--return-token-ids", choices=["auto", "on", "off"], default="auto",
                   help="ask for token_ids in chunks (exact tokens per chunk, exact multi-turn resends); "
                        "auto: on for tokenmill targets")
    t.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="local HF tokenizer directory, for targets without /tokenize")
    t.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="chatbot",
                   help="archetype (chatbot, agent, data-processor) or a YAML/JSON file (default chatbot)")
    w.add_argument("--num-prompts", type=int, default=None, help="requests per run (default: the workload's)")
    w.add_argument("--input-len", type=int, default=None, help="fixed input length (tokens), overriding the workload")
    w.add_argument("--output-len", type=int, default=None, help="fixed output length (tokens)")
    w.add_argument("--prefix-len", type=int, default=None, help="shared prefix length (tokens)")
    w.add_argument("--turns", type=int, default=None, help="fixed turns per conversation")
    w.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply every token length (inputs, outputs, prefix), e.g. 0.1 for a small model")
    w.add_argument("--request-rate", type=float, default=None,
                   help="rate mode: requests/s (inf = all at once; default: the workload's)")
    w.add_argument("--burstiness", type=float, default=None,
                   help="gamma arrivals with this shape (1 = Poisson, < 1 burstier)")
    w.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    w.add_argument("--duration", type=float, default=None, help="stop sending new requests after S seconds per run")
    w.add_argument("--temperature", type=float, default=None)
    w.add_argument("--no-ignore-eos", action="store_true", help="let the model stop at EOS (lengths vary)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the first run (default 1)")

    s = p.add_argument_group("SLO and cost")
    s.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLO limits in ms, keys ttft, tpot, itl, ttlt, e2el (replace the workload's)")
    s.add_argument("--slo-percentile", type=float, default=None, help="percentile the limits apply at")
    s.add_argument("--max-error-rate", type=float, default=None, help="SLO: highest share of failed requests")
    s.add_argument("--gpu-cost", type=float, default=None, metavar="$/H", help="dollars per GPU-hour")
    s.add_argument("--gpus-per-replica", type=int, default=None)

    r = p.add_argument_group("sweep, recipe and plan")
    r.add_argument("--num-rates", type=int, default=8, help="sweep: rates between sequential and burst (default 8)")
    r.add_argument("--sequential-prompts", type=int, default=None,
                   help="sweep: requests in the sequential run (default min(num-prompts, 20))")
    r.add_argument("--stop-error-rate", type=float, default=0.1,
                   help="sweep: stop once a rate's error rate exceeds this (default 0.1)")
    r.add_argument("--refine", type=int, default=0, metavar="N",
                   help="sweep/recipe: N more rate runs bisecting between the highest rate within the SLOs and "
                        "the first above it that missed (default 0)")
    r.add_argument("--target-qps", type=float, default=None, help="plan: average requests/s to serve")
    r.add_argument("--peak-to-average", type=float, default=None, help="plan: peak / average load")
    r.add_argument("--max-utilization", type=float, default=1.0, help="plan: headroom, e.g. 0.8")
    r.add_argument("--spare-replicas", type=int, default=0, help="plan: N+k redundancy")
    r.add_argument("--timing-tokens", type=int, default=1000, help="token timing: completion length (default 1000)")
    r.add_argument("--stall-ms", type=float, default=None,
                   help="token timing: stall threshold (default 3x the median ITL, at least 100 ms)")

    o = p.add_argument_group("output")
    o.add_argument("--save-result", action="store_true", help="write JSON, CSV, PNG and HTML")
    o.add_argument("--result-dir", default=None, help="where to write them (implies --save-result)")
    o.add_argument("--result-filename", default=None, help="base name of the files (default bench-MODE-TIME)")
    o.add_argument("--no-plots", action="store_true", help="JSON and CSV only")
    o.add_argument("--no-token-times", action="store_true", help="leave per-chunk timestamps out of the JSON")
    o.add_argument("--no-progress", action="store_true", help="no live progress bar")
    o.add_argument("--quiet", action="store_true", help="no console summary")
    return p


def add_bench_parsers(subparsers) -> None:
    """Register `bench` (with its modes and tools) and `plan` on an argparse subparsers object."""
    common = _common_parser()
    bench = subparsers.add_parser(
        "bench", help="benchmark an OpenAI-compatible server (or a local tokenmill) with a workload",
        description="Define the workload, benchmark one replica, size the fleet. See docs/bench.md.")
    modes = bench.add_subparsers(dest="bench_mode", metavar="MODE")
    for name, help_text in MODES.items():
        mode = modes.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "rate":
            mode.add_argument("rate", nargs="?", type=float, default=None, help="requests/s (or --request-rate)")
        if name == "concurrency":
            mode.add_argument("concurrency", type=int, help="closed-loop users")
        mode.set_defaults(func=cmd_bench)

    timing = modes.add_parser("timing", help="token timing view: stalls a user sees over a long completion",
                              description="Simulate what one user sees over a long completion, from the ITLs of a "
                                          "saved run (--from) or a parametric distribution.")
    timing.add_argument("--from", dest="source", default=None, metavar="RESULT.json", help="a saved bench result")
    timing.add_argument("--run", default=None, help="which run of it (default: the SLO-best, else the first)")
    timing.add_argument("--itl-median-ms", type=float, default=None)
    timing.add_argument("--itl-p99-ms", type=float, default=None)
    timing.add_argument("--stall-fraction", type=float, default=0.0, help="share of tokens that stall ...")
    timing.add_argument("--stall-length-ms", type=float, default=0.0, help="... for this long")
    timing.add_argument("--tokens", type=int, default=1000)
    timing.add_argument("--stall-ms", type=float, default=None)
    timing.add_argument("--completions", type=int, default=2000)
    timing.add_argument("--plot", default=None, metavar="PNG")
    timing.add_argument("--json", action="store_true")
    timing.set_defaults(func=cmd_timing)

    report = modes.add_parser("report", help="re-render the console summary, CSV, PNG and HTML of a saved result")
    report.add_argument("result", metavar="RESULT.json")
    report.add_argument("--result-dir", default=None, help="default: next to the JSON")
    report.set_defaults(func=cmd_report)

    show = modes.add_parser("workloads", help="list the archetypes, or print one as YAML (a start for a file)")
    show.add_argument("name", nargs="?", default=None)
    show.set_defaults(func=cmd_workloads)
    bench.set_defaults(func=lambda args: (bench.print_help(), 0)[1])

    plan = subparsers.add_parser("plan", help="capacity plan: replicas for a target QPS from a per-replica rate",
                                 description="replicas = ceil(target_qps x peak_to_average / (replica_rate x "
                                             "max_utilization)) + spare; cost and $/Mtok at the average load.")
    plan.add_argument("--from", dest="source", default=None, metavar="RESULT.json",
                      help="take the replica rate, tokens per request and prices from a saved sweep/recipe")
    plan.add_argument("--replica-rate", type=float, default=None, help="requests/s one replica sustains in SLO")
    plan.add_argument("--target-qps", type=float, default=None, help="average requests/s to serve")
    plan.add_argument("--peak-to-average", type=float, default=None, help="default 1, or the saved workload's")
    plan.add_argument("--max-utilization", type=float, default=1.0)
    plan.add_argument("--spare-replicas", type=int, default=0)
    plan.add_argument("--gpu-cost", type=float, default=None, metavar="$/H", help="default 2.5 or the saved one")
    plan.add_argument("--gpus-per-replica", type=int, default=None)
    plan.add_argument("--input-tokens", type=float, default=None, help="mean input tokens per request")
    plan.add_argument("--output-tokens", type=float, default=None, help="mean output tokens per request")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)


# ---- bench -------------------------------------------------------------------------------------------------

def parse_goodput(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {', '.join(GOODPUT_KEYS)}; got {item!r}")
        out[key] = float(value)
    return out


def build_workload(args):
    from tokenmill.bench.lengths import LengthDist
    from tokenmill.bench.workload import SLO, load_workload

    w = load_workload(args.workload).scaled(args.length_scale)
    if args.api:
        w.api = args.api
        w.prompt_source = "text" if args.api == "chat" else "ids"
    if args.num_prompts is not None:
        w.num_requests = args.num_prompts
    if args.input_len is not None:
        w.input_tokens = LengthDist("fixed", value=args.input_len)
    if args.output_len is not None:
        w.output_tokens = LengthDist("fixed", value=args.output_len)
    if args.prefix_len is not None:
        w.prefix.shared_tokens = args.prefix_len
    if args.turns is not None:
        w.prefix.turns = LengthDist("fixed", value=args.turns)
    if args.temperature is not None:
        w.temperature = args.temperature
    if args.no_ignore_eos:
        w.ignore_eos = False
    if args.goodput:
        limits = parse_goodput(args.goodput)
        w.slo = SLO(percentile=w.slo.percentile, max_error_rate=w.slo.max_error_rate,
                    **{f"{k}_ms": v for k, v in limits.items()})
    if args.slo_percentile is not None:
        w.slo.percentile = args.slo_percentile
    if args.max_error_rate is not None:
        w.slo.max_error_rate = args.max_error_rate
    if args.gpu_cost is not None:
        w.cost.gpu_dollars_per_hour = args.gpu_cost
    if args.gpus_per_replica is not None:
        w.cost.gpus_per_replica = args.gpus_per_replica
    if args.burstiness is not None:
        from tokenmill.bench.arrivals import ArrivalSpec

        w.arrival = ArrivalSpec("gamma", rate=w.arrival.mean_rate(), burstiness=args.burstiness)
    if args.request_rate is not None and args.bench_mode != "rate":
        w.arrival = w.arrival.with_rate(args.request_rate)
    w.__post_init__()
    return w


@contextlib.contextmanager
def local_server(model: str, extra: str, log):
    """A `tokenmill serve` subprocess for `model` ('default': the built-in model); yields its URL."""
    from tokenmill.testing.server_process import ServerProcess

    if model == "default":
        from tokenmill.models.default_model import default_model_dir

        model = default_model_dir()
    log_path = Path(tempfile.gettempdir()) / f"tokenmill-bench-serve-{os.getpid()}.log"
    log(f"starting tokenmill serve --model {model} {extra} (log: {log_path})")
    server = ServerProcess(Path(model), *shlex.split(extra), name=Path(model).name, log_path=log_path,
                           startup_timeout=600)
    log(f"server healthy at {server.url} after {server.startup_s:.1f} s")
    try:
        yield server.url
    finally:
        server.stop()


def in_process_target(args, log):
    """--engine-model PATH --in-process: the engine in this process, configured by --engine-args."""
    from tokenmill.bench.engine_target import EngineTarget, engine_config_from_args
    from tokenmill.models.default_model import default_model_dir

    model = str(default_model_dir()) if args.engine_model == "default" else args.engine_model
    config, max_queued = engine_config_from_args(model, args.engine_args)
    log(f"starting the engine in process: {model} {args.engine_args}".rstrip())
    return EngineTarget(config, max_queued_requests=max_queued, model_name=args.model)


async def bench_main(args, target, workload, log, state: dict | None = None):
    """Run the mode; `state` gets the Bench and the start time, so that an interrupted run can still
    save the runs that finished."""
    from tokenmill.bench.runner import Bench, BenchResult, _now

    started = _now()
    state = {} if state is None else state
    state["started"] = started
    async with Bench(target, workload, seed=args.seed, request_timeout=args.request_timeout, warmup=args.warmup,
                     progress=not args.no_progress and sys.stderr.isatty(), return_token_ids=args.return_token_ids,
                     tokenizer=args.tokenizer, max_concurrency=args.max_concurrency, duration=args.duration,
                     log=log) as bench:
        state["bench"] = bench
        extras: dict = {}
        mode = args.bench_mode
        if mode == "sequential":
            runs = [await bench.sequential()]
        elif mode == "burst":
            runs = [await bench.burst()]
        elif mode == "rate":
            rate = args.rate if args.rate is not None else args.request_rate
            runs = [await bench.rate(rate)]
        elif mode == "concurrency":
            runs = [await bench.concurrency(args.concurrency)]
        elif mode == "sweep":
            runs, info = await bench.sweep(args.num_rates, sequential_n=args.sequential_prompts,
                                           stop_error_rate=args.stop_error_rate, refine=args.refine)
            extras["sweep"] = info
        else:
            runs, extras = await bench.recipe(
                args.num_rates, sequential_n=args.sequential_prompts, target_qps=args.target_qps,
                peak_to_average=args.peak_to_average, max_utilization=args.max_utilization,
                spare_replicas=args.spare_replicas, timing_tokens=args.timing_tokens,
                stall_s=args.stall_ms / 1000 if args.stall_ms else None, stop_error_rate=args.stop_error_rate,
                refine=args.refine)
        settings = bench.settings()
    settings["command"] = "tokenmill bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 2 and sys.argv[1] == "bench" else None
    return BenchResult(mode=mode, target=target.to_dict(), workload=workload.to_dict(), runs=runs,
                       settings=settings, sweep=extras.get("sweep"), plan=extras.get("plan"),
                       token_timing=extras.get("token_timing"), started_at=started, finished_at=_now())


def cmd_bench(args) -> int:
    import httpx

    from tokenmill.bench.client import Target
    from tokenmill.bench.report import print_summary, write_outputs
    from tokenmill.errors import ModelLoadError

    def log(message):
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        workload = build_workload(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.in_process and not args.engine_model:
        print("error: --in-process needs --engine-model PATH (or 'default')", file=sys.stderr)
        return 2
    server = contextlib.nullcontext(None) if args.in_process else \
        local_server(args.engine_model, args.engine_args, log) if args.engine_model else \
        contextlib.nullcontext(args.base_url)
    state: dict = {}
    interrupted, target = False, None
    try:
        with server as url:
            target = in_process_target(args, log) if args.in_process else \
                Target(url, model=args.model, api_key=args.api_key)
            result = asyncio.run(bench_main(args, target, workload, log, state))
    except KeyboardInterrupt:
        result = partial_result(args, state, target, workload)
        if result is None:
            print("interrupted before any run finished: nothing to save", file=sys.stderr)
            return 130
        interrupted = True
        log(f"interrupted: saving the {len(result.runs)} run(s) that finished (the run in progress is dropped)")
    except httpx.HTTPError as e:
        print(f"error: cannot use {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print_summary(result)
    if args.save_result or args.result_dir or args.bench_mode == "recipe":
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = args.result_filename or f"bench-{result.mode}-{stamp}"
        paths = write_outputs(result, args.result_dir or ".", name, plots=not args.no_plots,
                              with_chunks=not args.no_token_times)
        for kind, path in paths.items():
            log(f"wrote {kind}: {path}")
    if interrupted:
        return 130
    return 0 if any(run.summary["completed"] for run in result.runs) else 1


def partial_result(args, state: dict, target, workload):
    """What an interrupted bench had finished, as a BenchResult marked interrupted (None: nothing)."""
    from tokenmill.bench.runner import BenchResult, _now, best_slo_run

    bench = state.get("bench")
    if bench is None or not bench.finished_runs:
        return None
    runs = list(bench.finished_runs)
    sweep = best_slo_run(runs) if args.bench_mode in ("sweep", "recipe") else None
    return BenchResult(mode=args.bench_mode, target=target.to_dict(), workload=workload.to_dict(), runs=runs,
                       settings={**bench.settings(), "interrupted": True}, sweep=None if sweep is None else {
                           "min_rate": runs[0].summary["request_throughput"],
                           "max_rate": max(r.summary["request_throughput"] for r in runs), "rates": [
                               r.offered_rate for r in runs if r.mode == "rate"], "skipped_rates": [],
                           "stop_reason": "interrupted", "refined_rates": [], **sweep},
                       started_at=state.get("started", ""), finished_at=_now())


# ---- tools ----------------------------------------------------------------------------------------------

def _best_run(result, name: str | None):
    if name is not None:
        for run in result.runs:
            if run.name == name:
                return run
        raise ValueError(f"no run named {name!r}; runs: {', '.join(r.name for r in result.runs)}")
    best = (result.sweep or {}).get("max_slo_run")
    return next((r for r in result.runs if r.name == best), result.runs[0])


def cmd_timing(args) -> int:
    import numpy as np

    from tokenmill.bench.report import load_result, plot_token_timing
    from tokenmill.bench.token_timing import ITLModel, simulate

    try:
        if args.source:
            run = _best_run(load_result(args.source), args.run)
            model = ITLModel(samples=np.asarray([v for r in run.records if r.ok for v in r.itls]))
        elif args.itl_median_ms is not None:
            model = ITLModel(median_s=args.itl_median_ms / 1000,
                             p99_s=args.itl_p99_ms / 1000 if args.itl_p99_ms else None,
                             stall_fraction=args.stall_fraction, stall_s=args.stall_length_ms / 1000)
        else:
            raise ValueError("give --from RESULT.json or --itl-median-ms (and --itl-p99-ms)")
        timing = simulate(model, args.tokens, args.stall_ms / 1000 if args.stall_ms else None, args.completions)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in timing.to_dict().items() if k != "example_itls"}, indent=1))
    else:
        print("\n".join(timing.lines()))
    if args.plot:
        plot_token_timing(timing.to_dict(), Path(args.plot))
    return 0


def cmd_report(args) -> int:
    from tokenmill.bench.report import load_result, print_summary, write_outputs

    path = Path(args.result)
    try:
        result = load_result(path)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(result)
    for kind, out in write_outputs(result, args.result_dir or path.parent, path.stem).items():
        print(f"wrote {kind}: {out}", file=sys.stderr)
    return 0


def cmd_workloads(args) -> int:
    from tokenmill.bench.workload import ARCHETYPES, archetype, dump_workload

    if args.name is None:
        for name, spec in ARCHETYPES.items():
            print(f"{name}: {spec['description']} (figure of merit: {', '.join(spec['figure_of_merit'])})")
        return 0
    try:
        print(dump_workload(archetype(args.name)), end="")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_plan(args) -> int:
    from tokenmill.bench.plan import capacity_plan, format_plan

    rate, p2a, cost, gpus, tin, tout = args.replica_rate, args.peak_to_average, args.gpu_cost, \
        args.gpus_per_replica, args.input_tokens, args.output_tokens
    target = args.target_qps
    try:
        if args.source:
            from tokenmill.bench.report import load_result

            result = load_result(args.source)
            best = (result.sweep or {}).get("max_slo_run")
            run = next((r for r in result.runs if r.name == best), None)
            if rate is None:
                if run is None:
                    raise ValueError(f"{args.source}: no run met the SLOs (or it is not a sweep); pass --replica-rate")
                rate = run.rate_for_plan
            if run is not None:
                tin = tin if tin is not None else run.summary["mean_input_tokens"]
                tout = tout if tout is not None else run.summary["mean_output_tokens"]
            w = result.workload
            p2a = p2a if p2a is not None else (w.get("peak_to_average") or _arrival_p2a(w.get("arrival", {})))
            cost = cost if cost is not None else w.get("cost", {}).get("gpu_dollars_per_hour")
            gpus = gpus if gpus is not None else w.get("cost", {}).get("gpus_per_replica")
            target = target if target is not None else w.get("target_qps")
        if rate is None or target is None:
            raise ValueError("need --replica-rate (or --from a sweep) and --target-qps")
        plan = capacity_plan(rate, target, p2a or 1.0, max_utilization=args.max_utilization,
                             spare_replicas=args.spare_replicas, gpu_dollars_per_hour=cost or 2.5,
                             gpus_per_replica=gpus or 1, input_tokens_per_request=tin or 0.0,
                             output_tokens_per_request=tout or 0.0)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    for key, value in format_plan(plan):
        print(f"{key:32s} {value}")
    for note in plan.notes or []:
        print(f"- {note}")
    return 0


def _arrival_p2a(arrival: dict) -> float:
    if arrival.get("process") == "onoff":
        on, off = float(arrival.get("on_s", 1)), float(arrival.get("off_s", 0))
        return (on + off) / on
    return 1.0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m tokenmill.bench.cli bench ...``) until the main CLI registers it."""
    parser = argparse.ArgumentParser(prog="tokenmill")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_bench_parsers(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
