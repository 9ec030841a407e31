"""Recent time series for the dashboard (`/v1/stats`), the GPU busy fraction, and the
underfed-GPU warning. Lives in the API process, fed on its event loop.

Every `interval` (1 s) `sample()` appends one point to a ring buffer of `history_s` (5 minutes):
TTFT and ITL p50/p95/p99 over the last `window_s` (10 s) of observations, generation and prompt
tokens/s over the interval, running/waiting requests and KV usage (latest), prefix-cache hit rate
over the window, engine step figures over the interval (steps/s, mean batch size, mean device
time, idle gap and host scheduling time per step), the device busy fraction over the window, and
the GPU's power, limit, temperature and utilization when NVML telemetry runs.

Busy fraction = sum(step device time) / (sum(step device time) + sum(idle gaps between
back-to-back steps)) over the steps of the window: how much of the wall time the engine had work
the device was computing. (Idle periods without requests do not count: that is no load, not a
starved GPU.)

Underfed-GPU rule, checked every sample over the last `window_s` once the window is full and
only on a GPU (CUDA-event step timing): the engine was under load in every interval of the window
(requests running and steps taken), and either
  - the busy fraction is below BUSY_MIN (0.80): the GPU waits on the host a large share of the
    time (scheduling, input preparation, IPC, Python) -- a starved GPU, not a slow one; or
  - decode tokens are at least DECODE_SHARE (90 %) of the scheduled tokens and the mean power
    draw is below POWER_MIN (70 %) of the enforced limit: decode-heavy work that leaves the
    GPU's power budget unused (the seed's 2 kW instead of 3 kW): batches too small to load it.
Each kind is logged at most once per WARN_EVERY_S (60 s).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass

logger = logging.getLogger(__name__)

BUSY_MIN = 0.80
POWER_MIN = 0.70
DECODE_SHARE = 0.90
WARN_EVERY_S = 60.0
RESERVOIR = 1024  # latency observations kept per interval (uniform sample beyond that)

SERIES = ("ttft_p50", "ttft_p95", "ttft_p99", "itl_p50", "itl_p95", "itl_p99", "gen_tok_s", "prompt_tok_s",
          "finished_s", "running", "waiting", "kv_usage", "prefix_hit_rate", "steps_s", "batch_size",
          "step_gpu_ms", "step_idle_ms", "step_sched_ms", "gpu_busy", "gpu_power_w", "gpu_power_limit_w",
          "gpu_temp_c", "gpu_util", "gpu_mem_util")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, int(-(-q * len(sorted_values) // 1)))  # ceil(q * n), at least 1
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Reservoir:
    def __init__(self, rng: random.Random):
        self.values: list[float] = []
        self.seen = 0
        self._rng = rng

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < RESERVOIR:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < RESERVOIR:
                self.values[j] = value


@dataclass
class _Interval:
    """Raw sums of one interval (kept for the window figures)."""

    seconds: float = 0.0
    steps: int = 0
    device_s: float = 0.0
    device_n: int = 0
    idle_s: float = 0.0
    idle_n: int = 0
    sched_s: float = 0.0
    batch: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    gen_tokens: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    loaded: bool = False  # requests were running at some step of the interval
    power_w: float | None = None
    power_limit_w: float | None = None
    prefix_queries: int = 0  # cumulative, at the end of the interval
    prefix_hits: int = 0


@dataclass
class WindowSummary:
    seconds: float
    under_load: bool
    steps: int
    busy_fraction: float | None
    mean_device_ms: float | None
    mean_idle_ms: float | None
    mean_sched_ms: float | None
    mean_batch: float | None
    decode_share: float | None
    power_w: float | None
    power_limit_w: float | None


def underfed_findings(w: WindowSummary, busy_min: float = BUSY_MIN, power_min: float = POWER_MIN,
                      decode_share: float = DECODE_SHARE) -> list[tuple[str, str]]:
    """(kind, message) for each underfed-GPU condition that holds over the window."""
    if not w.under_load or w.steps == 0:
        return []
    found = []
    if w.busy_fraction is not None and w.busy_fraction < busy_min:
        found.append(("busy", (
            f"underfed GPU: busy {w.busy_fraction:.0%} of the wall time over the last {w.seconds:.0f} s under load "
            f"(threshold {busy_min:.0%}): per step {w.mean_device_ms:.2f} ms on the GPU, {w.mean_idle_ms:.2f} ms "
            f"idle between steps, {w.mean_sched_ms:.2f} ms scheduling on the host, mean batch "
            f"{w.mean_batch:.1f} -- the host is not keeping the GPU fed")))
    if w.decode_share is not None and w.decode_share >= decode_share and w.power_w is not None \
            and w.power_limit_w and w.power_w < power_min * w.power_limit_w:
        found.append(("power", (
            f"underfed GPU: drawing {w.power_w:.0f} W of its {w.power_limit_w:.0f} W limit "
            f"({w.power_w / w.power_limit_w:.0%}, threshold {power_min:.0%}) over the last {w.seconds:.0f} s of "
            f"decode-heavy load ({w.decode_share:.0%} decode tokens, mean batch {w.mean_batch:.1f}, busy "
            f"{(w.busy_fraction or 0):.0%}) -- batches too small to load it (raise concurrency / max_num_seqs) "
            f"or the host is the bottleneck")))
    return found


class LiveStats:
    def __init__(self, interval: float = 1.0, history_s: float = 300.0, window_s: float = 10.0,
                 telemetry=None, clock=time.monotonic, wall_clock=time.time, seed: int = 0):
        self.interval = interval
        self.window_n = max(1, round(window_s / interval))
        self.points: deque[dict] = deque(maxlen=max(1, round(history_s / interval)))
        self.telemetry = telemetry
        self._clock, self._wall = clock, wall_clock
        self._rng = random.Random(seed)
        self._intervals: deque[_Interval] = deque(maxlen=self.window_n)
        self._ttft: deque[list[float]] = deque(maxlen=self.window_n)
        self._itl: deque[list[float]] = deque(maxlen=self.window_n)
        self._cur = _Interval()
        self._prefix_marks: deque[tuple[int, int]] = deque([(0, 0)], maxlen=self.window_n + 1)
        self._cur_ttft = _Reservoir(self._rng)
        self._cur_itl = _Reservoir(self._rng)
        self._last_sample = clock()
        self.last_stats = None
        self.device_timing = ""
        self.busy_fraction: float | None = None
        self._last_warned: dict[str, float] = {}
        self.warnings: list[str] = []  # every warning logged (tests, /v1/stats)

    # ---- inputs (event loop) --------------------------------------------------------------------

    def observe_ttft(self, seconds: float) -> None:
        self._cur_ttft.add(seconds)

    def observe_itl(self, seconds: float) -> None:
        self._cur_itl.add(seconds)

    def observe_tokens(self, generated: int = 0, prompt: int = 0) -> None:
        self._cur.gen_tokens += generated
        self._cur.prompt_tokens += prompt

    def observe_finished(self) -> None:
        self._cur.finished += 1

    def record_stats(self, stats) -> None:
        self.last_stats = stats
        c = self._cur
        c.prefix_queries, c.prefix_hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        if stats.device_timing:
            self.device_timing = stats.device_timing
        c.device_s += sum(stats.step_device_times)
        c.device_n += len(stats.step_device_times)
        c.idle_s += sum(stats.step_idle_times)
        c.idle_n += len(stats.step_idle_times)
        if stats.step_duration is None:
            return  # no step ran (stats after aborts)
        c.steps += 1
        c.sched_s += stats.step_scheduling_time or 0.0
        c.batch += stats.step_batch_size
        c.prefill_tokens += stats.num_prefill_tokens
        c.decode_tokens += stats.num_decode_tokens
        if stats.num_running:
            c.loaded = True

    # ---- one point per interval ----------------------------------------------------------------

    def sample(self) -> dict:
        now = self._clock()
        c = self._cur
        c.seconds = max(1e-9, now - self._last_sample)
        self._last_sample = now
        stats = self.last_stats
        gpu = self.telemetry.summary() if self.telemetry is not None else {}
        c.power_w, c.power_limit_w = gpu.get("power_w"), gpu.get("power_limit_w")
        self._intervals.append(c)
        self._prefix_marks.append((c.prefix_queries, c.prefix_hits))
        self._ttft.append(sorted(self._cur_ttft.values))
        self._itl.append(sorted(self._cur_itl.values))
        self._cur = _Interval(prefix_queries=c.prefix_queries, prefix_hits=c.prefix_hits)
        self._cur_ttft, self._cur_itl = _Reservoir(self._rng), _Reservoir(self._rng)

        window = self.window_summary()
        self.busy_fraction = window.busy_fraction
        ttft = sorted(v for bucket in self._ttft for v in bucket)
        itl = sorted(v for bucket in self._itl for v in bucket)
        # prefix-cache hit rate over the window: the cumulative counters now minus a window ago
        (q0, h0), (q1, h1) = self._prefix_marks[0], self._prefix_marks[-1]
        queries, hits = q1 - q0, h1 - h0
        point = {
            "t": round(self._wall(), 3),
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "ttft_p99": percentile(ttft, 0.99),
            "itl_p50": percentile(itl, 0.5), "itl_p95": percentile(itl, 0.95), "itl_p99": percentile(itl, 0.99),
            "gen_tok_s": c.gen_tokens / c.seconds, "prompt_tok_s": c.prompt_tokens / c.seconds,
            "finished_s": c.finished / c.seconds,
            "running": stats.num_running if stats else 0, "waiting": stats.num_waiting if stats else 0,
            "kv_usage": stats.kv_cache_usage if stats else 0.0,
            "prefix_hit_rate": hits / queries if queries > 0 else None,
            "steps_s": c.steps / c.seconds,
            "batch_size": c.batch / c.steps if c.steps else None,
            "step_gpu_ms": c.device_s / c.device_n * 1e3 if c.device_n else None,
            "step_idle_ms": c.idle_s / c.idle_n * 1e3 if c.idle_n else None,
            "step_sched_ms": c.sched_s / c.steps * 1e3 if c.steps else None,
            "gpu_busy": window.busy_fraction,
            "gpu_power_w": gpu.get("power_w"), "gpu_power_limit_w": gpu.get("power_limit_w"),
            "gpu_temp_c": gpu.get("temperature_c"), "gpu_util": gpu.get("sm_util"),
            "gpu_mem_util": gpu.get("mem_util"),
        }
        for key, value in point.items():
            if isinstance(value, float) and key != "t":
                point[key] = round(value, 6)
        self.points.append(point)
        self._check_underfed(window, now)
        return point

    def window_summary(self) -> WindowSummary:
        iv = list(self._intervals)
        steps = sum(i.steps for i in iv)
        device, idle = sum(i.device_s for i in iv), sum(i.idle_s for i in iv)
        device_n, idle_n = sum(i.device_n for i in iv), sum(i.idle_n for i in iv)
        tokens = sum(i.prefill_tokens + i.decode_tokens for i in iv)
        powers = [(i.power_w, i.power_limit_w) for i in iv if i.power_w is not None and i.power_limit_w]
        return WindowSummary(
            seconds=sum(i.seconds for i in iv),
            under_load=len(iv) == self.window_n and all(i.loaded for i in iv),
            steps=steps,
            busy_fraction=device / (device + idle) if device_n and (device + idle) > 0 else None,
            mean_device_ms=device / device_n * 1e3 if device_n else None,
            mean_idle_ms=idle / idle_n * 1e3 if idle_n else 0.0,
            mean_sched_ms=sum(i.sched_s for i in iv) / steps * 1e3 if steps else None,
            mean_batch=sum(i.batch for i in iv) / steps if steps else None,
            decode_share=sum(i.decode_tokens for i in iv) / tokens if tokens else None,
            power_w=sum(p for p, _ in powers) / len(powers) if powers else None,
            power_limit_w=sum(limit for _, limit in powers) / len(powers) if powers else None)

    def _check_underfed(self, window: WindowSummary, now: float) -> None:
        if self.device_timing != "cuda_events":
            return  # on the CPU "device time" is the forward's wall time: the rule means nothing
        for kind, message in underfed_findings(window):
            last = self._last_warned.get(kind)
            if last is not None and now - last < WARN_EVERY_S:
                continue
            self._last_warned[kind] = now
            self.warnings.append(message)
            logger.warning("%s", message)

    # ---- output -----------------------------------------------------------------------------------

    def series(self, seconds: float | None = None) -> dict:
        """Column arrays of the points of the last `seconds` (all when None)."""
        points = list(self.points)
        if seconds is not None and points:
            cutoff = points[-1]["t"] - seconds
            points = [p for p in points if p["t"] >= cutoff]
        out = {"t": [p["t"] for p in points]}
        for key in SERIES:
            out[key] = [p.get(key) for p in points]
        return out
