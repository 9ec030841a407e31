"""Benchmark modes: sequential, burst, rate, concurrency, sweep and the seed's one-replica recipe.

- sequential: one request at a time (closed loop, 1 worker): the minimum latency.
- burst: every request at t = 0, at most ``max_concurrency`` in flight: the maximum throughput.
- rate R: the workload's arrival process (Poisson unless it says otherwise) at R requests/s, open loop:
  requests are sent on schedule whether or not earlier ones finished (optionally capped in flight).
- concurrency C: C closed-loop users, each sending its next request when the previous one ends.
- sweep: sequential, burst, then K rates evenly spaced strictly between their request throughputs,
  lowest first (then, with refine > 0, bisection between the last rate that met the SLOs and the first
  that missed); stops early once a rate saturates the server (its queue grows: the median TTFT of the
  last quarter of requests exceeds twice that of the first quarter by more than a tenth of the arrival
  span) or its error rate exceeds the limit. Reports the highest rate that met the SLOs.
- recipe: the sweep, then the token-timing view of the best run and the capacity plan.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from dataclasses import dataclass, field

import numpy as np

from tokenmill.bench.client import Clock, Target, discover, make_http_client, send
from tokenmill.bench.metrics import RequestRecord, summarize
from tokenmill.bench.plan import capacity_plan
from tokenmill.bench.prompts import LocalTokenizer, PromptFactory, RequestSource, ServerTokenizer
from tokenmill.bench.token_timing import ITLModel, simulate
from tokenmill.bench.workload import Workload

DEFAULT_BURST_CONCURRENCY = 512     # guidellm's throughput-mode cap


@dataclass
class RunResult:
    name: str
    mode: str
    records: list[RequestRecord]
    summary: dict
    offered_rate: float | None = None      # requests/s (inf: burst)
    concurrency: int | None = None         # workers (closed loop) or in-flight cap (open loop)
    source: dict = field(default_factory=dict)
    saturation: dict | None = None
    started_at: str = ""

    @property
    def saturated(self) -> bool:
        return bool(self.saturation and self.saturation["saturated"])

    @property
    def rate_for_plan(self) -> float:
        """The load this run shows a replica can take: the offered rate of a rate run, else the achieved."""
        if self.mode == "rate" and self.offered_rate is not None and math.isfinite(self.offered_rate):
            return self.offered_rate
        return self.summary["request_throughput"]

    def to_dict(self, with_requests: bool = True, with_chunks: bool = True) -> dict:
        out = {"name": self.name, "mode": self.mode, "offered_rate": _json_float(self.offered_rate),
               "concurrency": self.concurrency, "started_at": self.started_at, "source": self.source,
               "saturation": self.saturation, "summary": self.summary}
        if with_requests:
            out["requests"] = [r.to_dict(with_chunks) for r in self.records]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunResult":
        rate = data.get("offered_rate")
        return cls(data["name"], data["mode"], [RequestRecord.from_dict(r) for r in data.get("requests", [])],
                   data["summary"], float(rate) if rate is not None else None, data.get("concurrency"),
                   data.get("source", {}), data.get("saturation"), data.get("started_at", ""))


@dataclass
class BenchResult:
    mode: str
    target: dict
    workload: dict
    runs: list[RunResult]
    settings: dict = field(default_factory=dict)
    sweep: dict | None = None
    plan: dict | None = None
    token_timing: dict | None = None
    started_at: str = ""
    finished_at: str = ""


def _json_float(x):
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def saturation_check(records: list[RequestRecord], growth: float = 0.1) -> dict:
    """Did the queue grow during the run? Compares the median TTFT of the first and last quarters of the
    successful requests (by send time) with the arrival span."""
    ok = sorted((r for r in records if r.ok and r.ttft is not None), key=lambda r: r.send_s)
    if len(ok) < 8:
        return {"saturated": False, "reason": "too few requests to tell"}
    q = len(ok) // 4
    first = float(np.median([r.ttft for r in ok[:q]]))
    last = float(np.median([r.ttft for r in ok[-q:]]))
    span = ok[-1].send_s - ok[0].send_s
    saturated = last > 2 * first and (last - first) > growth * span
    return {"saturated": bool(saturated), "ttft_first_quarter_s": first, "ttft_last_quarter_s": last,
            "arrival_span_s": span,
            "reason": "TTFT grew with the run: requests queue faster than they finish" if saturated else "stable"}


class Progress:
    """A rich progress bar on stderr (no-op when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def start(self, name: str, total: int):
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeElapsedColumn

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                                console=Console(stderr=True), transient=False)
        self.bar.start()
        self.task = self.bar.add_task(name, total=total, status="")
        self.counts = {"ok": 0, "failed": 0}

    def update(self, record: RequestRecord, in_flight: int):
        if self.bar is None:
            return
        self.counts["ok" if record.ok else "failed"] += 1
        self.bar.update(self.task, advance=1,
                        status=f"ok {self.counts['ok']}  failed {self.counts['failed']}  in flight {in_flight}")

    def stop(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Bench:
    """Runs benchmarks of one workload against one target. Use as ``async with Bench(...) as bench``."""

    def __init__(self, target: Target, workload: Workload, *, seed: int = 0, request_timeout: float = 600.0,
                 warmup: int = 0, progress: bool = False, clock: Clock = time.perf_counter,
                 return_token_ids: str = "auto", tokenizer: str | None = None,
                 max_concurrency: int | None = None, duration: float | None = None, log=None):
        self.target, self.workload, self.seed = target, workload, seed
        self.request_timeout, self.warmup, self.clock = request_timeout, warmup, clock
        self.return_token_ids, self.tokenizer_path = return_token_ids, tokenizer
        self.max_concurrency, self.duration = max_concurrency, duration
        self.progress = Progress(progress)
        self.log = log or (lambda message: None)
        self.runs_started = 0
        self.finished_runs: list[RunResult] = []   # every run that completed, in order (kept on Ctrl-C)
        self.http = None
        self.factory: PromptFactory | None = None

    @property
    def in_process(self) -> bool:
        return getattr(self.target, "in_process", False)

    async def __aenter__(self) -> "Bench":
        if not self.in_process:
            connections = max(self.max_concurrency or 0, self.workload.num_requests, 64)
            self.http = make_http_client(min(connections, 4096), self.request_timeout)
        try:
            await self._setup()
        except BaseException:
            await self._close()
            raise
        return self

    async def _setup(self) -> None:
        if self.in_process:
            await self.target.open()
        else:
            await discover(self.http, self.target, self.return_token_ids)
        if self.in_process:
            tokenizer = self.target.tokenizer()
        elif self.tokenizer_path:
            tokenizer = LocalTokenizer(self.tokenizer_path)
        elif self.target.can_tokenize:
            tokenizer = ServerTokenizer(self.http, self.target)
        else:
            tokenizer = None
            self.log("the target has no /tokenize and no --tokenizer was given: text prompts with approximate "
                     "lengths (~4 characters per token)")
        self.factory = PromptFactory(tokenizer)
        await self.factory.setup()
        if self.warmup:
            await self._warmup(self.warmup)

    async def __aexit__(self, *exc):
        self.progress.stop()
        await self._close()

    async def _close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        if self.in_process:
            self.target.close()

    async def _send(self, request, run_start: float = 0.0):
        """One request to the target, HTTP or in-process: (RequestRecord, Reply)."""
        kwargs = dict(temperature=self.workload.temperature, ignore_eos=self.workload.ignore_eos,
                      timeout=self.request_timeout, clock=self.clock, run_start=run_start)
        if self.in_process:
            return await self.target.send(request, **kwargs)
        return await send(self.http, self.target, request, **kwargs)

    def settings(self) -> dict:
        return {"seed": self.seed, "request_timeout_s": self.request_timeout, "warmup": self.warmup,
                "max_concurrency": self.max_concurrency, "duration_s": self.duration,
                "return_token_ids": self.target.return_token_ids, "tokenizer": "the engine's" if self.in_process else
                (self.tokenizer_path or ("target /tokenize" if self.target.can_tokenize else
                                         "none (approximate lengths)"))}

    def _source(self, n: int) -> RequestSource:
        k = self.runs_started
        self.runs_started += 1
        return RequestSource(self.workload, self.factory, n, seed=[self.seed, k], max_model_len=self.target.max_model_len,
                             prefix_seed=self.seed)

    async def _warmup(self, n: int) -> None:
        source = RequestSource(self.workload, self.factory, n, seed=[self.seed, 10_000],
                               max_model_len=self.target.max_model_len, prefix_seed=self.seed)
        await source.prepare()
        for _ in range(n):
            await self._send(source.next())

    async def _execute(self, name: str, mode: str, n: int, *, offsets: np.ndarray | None = None,
                       workers: int | None = None, cap: int | None = None,
                       offered_rate: float | None = None) -> RunResult:
        source = self._source(n)
        await source.prepare()
        records: list[RequestRecord] = []
        in_flight = 0
        started_at = _now()
        self.progress.start(name, n)
        t0 = self.clock()
        deadline = t0 + self.duration if self.duration else None

        async def one(request):
            nonlocal in_flight
            in_flight += 1
            record, reply = await self._send(request, run_start=t0)
            in_flight -= 1
            await source.complete(request, record.ok, reply, record.output_tokens, reply.prompt_tokens)
            records.append(record)
            self.progress.update(record, in_flight)

        try:
            if workers:   # closed loop
                async def worker():
                    while not (deadline and self.clock() >= deadline):
                        request = source.next(self.clock() - t0)
                        if request is None:
                            return
                        await one(request)

                await asyncio.gather(*(worker() for _ in range(workers)))
            else:         # open loop
                semaphore = asyncio.Semaphore(cap) if cap else None
                tasks = []

                async def capped(request):
                    try:
                        await one(request)
                    finally:
                        if semaphore is not None:
                            semaphore.release()

                for offset in offsets:
                    delay = t0 + float(offset) - self.clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if deadline and self.clock() >= deadline:
                        break
                    if semaphore is not None:
                        await semaphore.acquire()
                    request = source.next(float(offset))
                    tasks.append(asyncio.create_task(capped(request)))
                    await asyncio.sleep(0)   # let the request go out before scheduling the next
                await asyncio.gather(*tasks)
        finally:
            self.progress.stop()
        records.sort(key=lambda r: r.index)
        duration = (max(r.end_s for r in records) - min(r.send_s for r in records)) if records else 0.0
        summary = summarize(records, duration, self.workload.slo, self.workload.cost.replica_dollars_per_hour)
        result = RunResult(name, mode, records, summary, offered_rate, workers or cap, source.stats(),
                           started_at=started_at)
        if mode == "rate":
            result.saturation = saturation_check(records)
        self.log(one_line(result))
        self.finished_runs.append(result)
        return result

    # ---- modes --------------------------------------------------------------------------------------------

    def _n(self, n: int | None) -> int:
        return n if n is not None else self.workload.num_requests

    async def sequential(self, n: int | None = None) -> RunResult:
        return await self._execute("sequential", "sequential", self._n(n), workers=1)

    async def burst(self, n: int | None = None, cap: int | None = None) -> RunResult:
        n = self._n(n)
        cap = cap or self.max_concurrency or min(n, DEFAULT_BURST_CONCURRENCY)
        return await self._execute("burst", "burst", n, offsets=np.zeros(n), cap=cap, offered_rate=math.inf)

    async def rate(self, rate: float | None = None, n: int | None = None, burstiness: float | None = None,
                   cap: int | None = None) -> RunResult:
        """The workload's arrival process at `rate` (default: its own rate)."""
        n = self._n(n)
        arrival = self.workload.arrival
        if burstiness is not None:
            arrival = type(arrival)("gamma", rate=arrival.mean_rate(), burstiness=burstiness)
        if rate is not None:
            arrival = arrival.with_rate(rate)
        offsets = arrival.offsets(n, np.random.default_rng([self.seed, self.runs_started, 1]))
        mean = arrival.mean_rate()
        name = "burst" if math.isinf(mean) else f"rate {mean:.3g}/s"
        return await self._execute(name, "rate", n, offsets=offsets, cap=cap or self.max_concurrency,
                                   offered_rate=mean)

    async def concurrency(self, c: int, n: int | None = None) -> RunResult:
        return await self._execute(f"concurrency {c}", "concurrency", self._n(n), workers=c)

    async def sweep(self, num_rates: int = 8, n: int | None = None, sequential_n: int | None = None,
                    stop_error_rate: float = 0.1, refine: int = 0) -> tuple[list[RunResult], dict]:
        n = self._n(n)
        seq = await self.sequential(sequential_n if sequential_n is not None else min(n, 20))
        burst = await self.burst(n)
        runs = [seq, burst]
        lo, hi = seq.summary["request_throughput"], burst.summary["request_throughput"]
        rates = [float(r) for r in np.linspace(lo, hi, num_rates + 2)[1:-1]] if hi > lo and num_rates > 0 else []
        stop_reason, skipped = None, []
        for i, r in enumerate(rates):
            result = await self.rate(r, n)
            runs.append(result)
            if result.saturated:
                stop_reason = f"saturated at {r:.3g} req/s ({result.saturation['reason']})"
            elif result.summary["error_rate"] > stop_error_rate:
                stop_reason = f"error rate {result.summary['error_rate']:.1%} > {stop_error_rate:.0%} at {r:.3g} req/s"
            if stop_reason:
                skipped = rates[i + 1:]
                break
        refined = await self._refine(runs, refine, n)
        info = {"min_rate": lo, "max_rate": hi, "rates": rates, "skipped_rates": skipped, "stop_reason": stop_reason,
                "refined_rates": refined, **best_slo_run(runs)}
        return runs, info

    async def _refine(self, runs: list[RunResult], steps: int, n: int) -> list[float]:
        """Bisect between the highest rate that met the SLOs and the first one above it that missed
        (vLLM's SLA search), `steps` more rate runs; appended to `runs`. Stops early once the two are
        within 2% of each other."""
        tried: list[float] = []
        for _ in range(steps):
            best = best_slo_run(runs)
            if best["max_slo_rate"] is None:
                break
            low = best["max_slo_rate"]
            missed = sorted(r.rate_for_plan for r in runs if r.mode != "burst" and r.rate_for_plan > low
                            and not r.summary.get("slo", {}).get("met"))
            if not missed or missed[0] - low < 0.02 * missed[0]:
                break
            mid = (low + missed[0]) / 2
            runs.append(await self.rate(mid, n))
            tried.append(mid)
        return tried

    async def recipe(self, num_rates: int = 8, n: int | None = None, sequential_n: int | None = None,
                     target_qps: float | None = None, peak_to_average: float | None = None,
                     max_utilization: float = 1.0, spare_replicas: int = 0, timing_tokens: int = 1000,
                     stall_s: float | None = None, stop_error_rate: float = 0.1,
                     refine: int = 0) -> tuple[list[RunResult], dict]:
        runs, info = await self.sweep(num_rates, n, sequential_n, stop_error_rate, refine)
        best = next((r for r in runs if r.name == info["max_slo_run"]), None)
        timing_run = best or runs[0]
        itls = [v for rec in timing_run.records if rec.ok for v in rec.itls]
        extras: dict = {"sweep": info}
        if itls:
            timing = simulate(ITLModel(samples=np.asarray(itls)), tokens=timing_tokens, threshold_s=stall_s,
                              seed=self.seed)
            extras["token_timing"] = {"run": timing_run.name, **timing.to_dict()}
        extras["plan"] = plan_from_run(best, self.workload, target_qps, peak_to_average, max_utilization,
                                       spare_replicas)
        return runs, extras


def best_slo_run(runs: list[RunResult]) -> dict:
    """The highest sustained request rate within the SLOs. Sustained: sequential, rate and concurrency runs
    (not burst: N requests at once are a transient, not a load a replica can hold). Conservative: walking
    the runs by rate upwards, the last one that met the SLOs before the first that missed; a run that met
    them above a miss is reported (``max_slo_rate_any``) but not trusted, as it points at noisy measurements."""
    sustained = sorted((r for r in runs if r.mode != "burst"), key=lambda r: r.rate_for_plan)
    met = [r for r in sustained if r.summary.get("slo", {}).get("met")]
    out = {"max_slo_rate": None, "max_slo_run": None, "slo_note": None,
           "max_slo_rate_any": max((r.rate_for_plan for r in met), default=None)}
    best = None
    for run in sustained:
        if not run.summary.get("slo", {}).get("met"):
            break
        best = run
    if best is not None:
        out.update(max_slo_rate=best.rate_for_plan, max_slo_run=best.name)
        if best is sustained[-1]:
            out["slo_note"] = ("the SLOs held at every rate tried: the replica's rate within the SLOs is at least "
                               "this, possibly up to the burst throughput")
    above = [r.name for r in met if best is None or r.rate_for_plan > best.rate_for_plan]
    if above:
        missed = next(r.name for r in sustained if not r.summary.get("slo", {}).get("met"))
        out["slo_note"] = (f"{', '.join(above)} met the SLOs above {missed}, which missed them: the measurements "
                           "are noisy (other load on the machine, too few requests); the plan uses the rate below "
                           "the first miss")
    return out


def plan_from_run(best: RunResult | None, workload: Workload, target_qps: float | None,
                  peak_to_average: float | None, max_utilization: float = 1.0, spare_replicas: int = 0) -> dict:
    target = target_qps or workload.target_qps or workload.arrival.mean_rate()
    p2a = peak_to_average or workload.plan_peak_to_average()
    if best is None:
        return {"error": "no run met the SLOs: one replica cannot serve this workload within its SLO at any "
                         "measured rate. Relax the SLO, or make the replica faster (more GPUs per replica, "
                         "quantization, speculative decoding).", "target_qps": target, "peak_to_average": p2a}
    plan = capacity_plan(best.rate_for_plan, target, p2a, max_utilization=max_utilization,
                         spare_replicas=spare_replicas, gpu_dollars_per_hour=workload.cost.gpu_dollars_per_hour,
                         gpus_per_replica=workload.cost.gpus_per_replica,
                         input_tokens_per_request=best.summary["mean_input_tokens"] or 0.0,
                         output_tokens_per_request=best.summary["mean_output_tokens"] or 0.0)
    return {"from_run": best.name, **plan.to_dict()}


def one_line(run: RunResult) -> str:
    s = run.summary
    ms = lambda v: "-" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
    slo = s.get("slo")
    verdict = "" if slo is None else (" SLO met" if slo["met"] else " SLO missed")
    sat = " SATURATED" if run.saturated else ""
    return (f"{run.name}: {s['completed']}/{s['requests']} ok, {s['request_throughput']:.2f} req/s, "
            f"{s['output_throughput']:.1f} out tok/s, TTFT p50 {ms(s['ttft']['p50'])} ms, "
            f"TPOT p50 {ms(s['tpot']['p50'])} ms{verdict}{sat}")
