"""GPU telemetry and engine step stats during a throughput run (run on a CUDA machine).

Starts `tokenmill serve` on a model shape with random weights (default Llama-8B), puts a
concurrent streaming load on it, and scrapes /metrics once a second while it runs: NVML power,
limit, temperature, SM/memory utilization, SM clock, throttle reasons; the engine's GPU busy
fraction and step device/idle/scheduling times; the NVML sampler's own cost per sample. Writes
DIR/telemetry_check.json (summary + the per-second samples) and prints the lines for
docs/performance.md. With --compare-off it runs the same load again on a server with the
sampler off (TOKENMILL_GPU_TELEMETRY_INTERVAL=0) and reports the throughput difference.

    python benchmarks/telemetry_check.py --shape llama-8b --num-requests 256 --input-len 512 \\
        --output-len 256 --out DIR [--compare-off] [-- extra serve flags]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import run_load  # noqa: E402
from shapes import SHAPES, write_dummy_model_dir  # noqa: E402

from tokenmill.testing.server_process import ServerProcess  # noqa: E402

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(url: str) -> dict[str, float]:
    """name{labels} -> value, and name -> sum over label sets."""
    text = httpx.get(url + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        out[name + labels] = value
        out[name] = out.get(name, 0.0) + value
    return out


def sample_row(m: dict[str, float], t: float) -> dict:
    get = m.get
    return {
        "t": round(t, 3),
        "power_w": get("tokenmill:gpu_power_watts"), "power_limit_w": get("tokenmill:gpu_power_limit_watts"),
        "temperature_c": get("tokenmill:gpu_temperature_celsius"),
        "sm_util": get("tokenmill:gpu_sm_utilization_perc"), "mem_util": get("tokenmill:gpu_memory_utilization_perc"),
        "sm_clock_mhz": None if get("tokenmill:gpu_sm_clock_hertz") is None
        else get("tokenmill:gpu_sm_clock_hertz") / 1e6,
        "throttle_mask": get("tokenmill:gpu_clock_throttle_reasons"),
        "gpu_busy_fraction": get("tokenmill:gpu_busy_fraction"),
        "running": get("tokenmill:num_requests_running"), "waiting": get("tokenmill:num_requests_waiting"),
        "kv_usage": get("tokenmill:kv_cache_usage_perc"),
        "generation_tokens": get("tokenmill:generation_tokens_total"),
        **{key: get(f"tokenmill:{key}") for key in (
            "step_gpu_time_seconds_sum", "step_gpu_time_seconds_count", "step_idle_seconds_sum",
            "step_idle_seconds_count", "step_scheduling_time_seconds_sum", "step_scheduling_time_seconds_count",
            "step_duration_seconds_sum", "step_duration_seconds_count", "step_batch_size_sum",
            "step_batch_size_count", "gpu_telemetry_sample_seconds_sum", "gpu_telemetry_sample_seconds_count",
            "gpu_telemetry_sample_cpu_seconds_sum", "gpu_telemetry_sample_cpu_seconds_count")},
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _delta_mean(first: dict, last: dict, name: str):
    s0, s1 = first.get(f"{name}_sum"), last.get(f"{name}_sum")
    c0, c1 = first.get(f"{name}_count"), last.get(f"{name}_count")
    if None in (s0, s1, c0, c1) or c1 - c0 <= 0:
        return None
    return (s1 - s0) / (c1 - c0)


def run_once(args, model_dir: Path, out: Path, telemetry_interval: float, tag: str) -> dict:
    os.environ["TOKENMILL_GPU_TELEMETRY_INTERVAL"] = str(telemetry_interval)
    server = ServerProcess(model_dir, "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096",
                           "--max-num-seqs", str(max(256, args.num_requests)), *args.serve_args,
                           name="bench", startup_timeout=900, log_path=out / f"telemetry_check_server_{tag}.log")
    result: dict = {"telemetry_interval_s": telemetry_interval, "startup_s": server.startup_s}
    try:
        rng = random.Random(0)
        vocab = SHAPES[args.shape]["vocab_size"]
        prompt = lambda: [rng.randrange(10, vocab) for _ in range(args.input_len)]  # noqa: E731
        # Warm-up at the load's size (short outputs): Triton compiles kernels for new shapes on first
        # use, which would otherwise land in whichever server runs first (--compare-off).
        asyncio.run(run_load(server.url, [prompt() for _ in range(args.num_requests)], 16, concurrent=True))
        prompts = [prompt() for _ in range(args.num_requests)]
        samples: list[dict] = []
        done = threading.Event()
        load_result: dict = {}

        def load():
            try:
                load_result.update(asyncio.run(run_load(server.url, prompts, args.output_len, concurrent=True)))
            finally:
                done.set()

        thread = threading.Thread(target=load)
        start = time.monotonic()
        thread.start()
        while not done.wait(args.scrape_interval):
            try:
                samples.append(sample_row(scrape(server.url), time.monotonic() - start))
            except httpx.HTTPError as e:
                samples.append({"t": time.monotonic() - start, "error": repr(e)})
        thread.join()
        result["load"] = load_result
        result["stats_endpoint"] = {k: v for k, v in httpx.get(server.url + "/v1/stats", timeout=5).json().items()
                                    if k != "series"}
        result["samples"] = samples
        result["summary"] = summarize(samples, telemetry_interval)
    finally:
        result["exit_code_after_sigterm"] = server.stop(signal.SIGTERM, timeout=60)
        log = (out / f"telemetry_check_server_{tag}.log").read_text(errors="replace")
        result["underfed_warnings"] = [line for line in log.splitlines() if "underfed GPU" in line]
    return result


def summarize(samples: list[dict], interval: float) -> dict:
    """Over the samples taken while requests were running (the steady part of the load)."""
    loaded = [s for s in samples if "error" not in s and (s.get("running") or 0) > 0]
    if len(loaded) < 2:
        return {"loaded_samples": len(loaded)}
    first, last = loaded[0], loaded[-1]
    power, limit = _mean(s["power_w"] for s in loaded), _mean(s["power_limit_w"] for s in loaded)
    step_gpu = _delta_mean(first, last, "step_gpu_time_seconds")
    sample_cost = _delta_mean(first, last, "gpu_telemetry_sample_seconds")
    sample_cpu = _delta_mean(first, last, "gpu_telemetry_sample_cpu_seconds")
    wall = last["t"] - first["t"]
    gpu_sum = (last.get("step_gpu_time_seconds_sum") or 0) - (first.get("step_gpu_time_seconds_sum") or 0)
    out = {
        "loaded_samples": len(loaded), "loaded_seconds": wall,
        "power_w_mean": power, "power_w_max": max((s["power_w"] for s in loaded if s["power_w"] is not None),
                                                  default=None),
        "power_limit_w": limit, "power_fraction_of_limit": power / limit if power and limit else None,
        "temperature_c_max": max((s["temperature_c"] for s in loaded if s["temperature_c"] is not None),
                                 default=None),
        "sm_util_mean": _mean(s["sm_util"] for s in loaded), "mem_util_mean": _mean(s["mem_util"] for s in loaded),
        "sm_clock_mhz_mean": _mean(s["sm_clock_mhz"] for s in loaded),
        "throttle_masks_seen": sorted({int(s["throttle_mask"]) for s in loaded if s["throttle_mask"] is not None}),
        "gpu_busy_fraction_mean": _mean(s["gpu_busy_fraction"] for s in loaded),
        "device_time_over_wall": gpu_sum / wall if wall > 0 else None,
        "step_gpu_ms_mean": None if step_gpu is None else step_gpu * 1e3,
        "step_idle_ms_mean": None if (v := _delta_mean(first, last, "step_idle_seconds")) is None else v * 1e3,
        "step_sched_ms_mean": None if (v := _delta_mean(first, last, "step_scheduling_time_seconds")) is None
        else v * 1e3,
        "step_duration_ms_mean": None if (v := _delta_mean(first, last, "step_duration_seconds")) is None
        else v * 1e3,
        "batch_size_mean": _delta_mean(first, last, "step_batch_size"),
        # Wall time of a sample includes the sampler thread's waits for the GIL (free for the rest of
        # the process); CPU time is what it takes from the API process.
        "telemetry_sample_wall_ms_mean": None if sample_cost is None else sample_cost * 1e3,
        "telemetry_sample_cpu_ms_mean": None if sample_cpu is None else sample_cpu * 1e3,
        # The sampler runs in the API process once per interval: its CPU share of wall time (which
        # is also its share of the time of the steps run meanwhile), and one sample's CPU time
        # next to one step's device time.
        "telemetry_cpu_fraction_of_wall": None if sample_cpu is None or not interval else sample_cpu / interval,
        "telemetry_cpu_over_step_gpu_time": None if sample_cpu is None or not step_gpu else sample_cpu / step_gpu,
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--telemetry-interval", type=float, default=1.0)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--compare-off", action="store_true", help="run again with the NVML sampler off")
    parser.add_argument("--out", default=".")
    parser.add_argument("serve_args", nargs="*", help="extra flags for tokenmill serve (after --)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_dummy_model_dir(Path(tempfile.mkdtemp()) / args.shape, SHAPES[args.shape])
    result = {"shape": args.shape, "num_requests": args.num_requests, "input_len": args.input_len,
              "output_len": args.output_len, "on": run_once(args, model_dir, out, args.telemetry_interval, "on")}
    if args.compare_off:
        result["off"] = run_once(args, model_dir, out, 0.0, "off")
        on, off = result["on"]["load"].get("output_tok_s"), result["off"]["load"].get("output_tok_s")
        if on and off:
            result["throughput_change_with_telemetry"] = on / off - 1
        tpot_on, tpot_off = (result[k]["load"].get("tpot", {}).get("mean") for k in ("on", "off"))
        if tpot_on and tpot_off:
            result["tpot_change_with_telemetry"] = tpot_on / tpot_off - 1
    (out / "telemetry_check.json").write_text(json.dumps(result, indent=2))

    on = result["on"]
    s, load = on["summary"], on["load"]

    def f(value, scale=1.0, digits=1):
        return "-" if value is None else f"{value * scale:.{digits}f}"

    print(f"\ntelemetry_check {args.shape}: {load.get('completed')}/{load.get('requests')} requests, "
          f"{f(load.get('output_tok_s'), digits=0)} output tok/s")
    print(f"  GPU power mean {f(s.get('power_w_mean'), digits=0)} W (max {f(s.get('power_w_max'), digits=0)} W) of "
          f"{f(s.get('power_limit_w'), digits=0)} W limit = {f(s.get('power_fraction_of_limit'), 100, 0)} %; "
          f"SM util {f(s.get('sm_util_mean'), 100, 0)} %, memory util {f(s.get('mem_util_mean'), 100, 0)} %, "
          f"SM clock {f(s.get('sm_clock_mhz_mean'), digits=0)} MHz, "
          f"max temp {f(s.get('temperature_c_max'), digits=0)} C")
    print(f"  engine: GPU busy fraction {f(s.get('gpu_busy_fraction_mean'), 100, 1)} % (device time / wall "
          f"{f(s.get('device_time_over_wall'), 100, 1)} %); per step {f(s.get('step_gpu_ms_mean'), digits=2)} ms "
          f"device, {f(s.get('step_idle_ms_mean'), digits=2)} ms idle gap, {f(s.get('step_sched_ms_mean'), digits=3)} "
          f"ms scheduling, batch {f(s.get('batch_size_mean'))}")
    print(f"  telemetry: {f(s.get('telemetry_sample_cpu_ms_mean'), digits=3)} ms CPU "
          f"({f(s.get('telemetry_sample_wall_ms_mean'), digits=3)} ms wall, GIL waits included) per NVML sample "
          f"every {args.telemetry_interval} s = {f(s.get('telemetry_cpu_fraction_of_wall'), 100, 3)} % of wall "
          f"time, {f(s.get('telemetry_cpu_over_step_gpu_time'), 100, 2)} % of one step's device time")
    if "throughput_change_with_telemetry" in result:
        print(f"  with telemetry vs without: throughput {result['throughput_change_with_telemetry'] * 100:+.2f} %, "
              f"mean TPOT {result.get('tpot_change_with_telemetry', float('nan')) * 100:+.2f} % "
              f"({f(result['off']['load'].get('output_tok_s'), digits=0)} tok/s without)")
    print(f"  underfed-GPU warnings: {len(on['underfed_warnings'])}")
    for line in on["underfed_warnings"][:3]:
        print("    " + line[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
