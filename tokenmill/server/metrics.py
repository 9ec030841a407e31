"""Prometheus metrics, named after vLLM's under a `tokenmill:` prefix.

Latencies are measured in the API process as outputs arrive (what a client sees, minus the
network); engine-wide state (running, waiting, KV usage, preemptions) and each step's figures
(batch size, prefill/decode tokens, host scheduling time, device time, idle gap) come with every
step's `SchedulerStats` from the engine core. The same observations feed `LiveStats` (the
dashboard's recent series, the GPU busy fraction, the underfed-GPU warning). GPU gauges (NVML)
are added to the same registry by `tokenmill.ops.gpu_telemetry` where a GPU is present.
See docs/observability.md for the list.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

from tokenmill.engine.messages import SchedulerStats
from tokenmill.server.live_stats import LiveStats

disable_created_metrics()  # no *_created series, as vLLM: they double the scrape for nothing

# vLLM's buckets, so dashboards built for vLLM read the same.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
STEP_TIME_BUCKETS = [0.0005, 0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                     0.15, 0.25, 0.5, 1.0, 2.5, 5.0]
STEP_IDLE_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.125,
                     0.25, 0.5, 1.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
KV_USAGE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
STEP_TOKEN_BUCKETS = [0, 1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
DETOKENIZE_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class EngineMetrics:
    def __init__(self, model_name: str, live: LiveStats | None = None):
        self.registry = CollectorRegistry()
        self.live = live if live is not None else LiveStats()
        labels = ["model_name"]
        r = self.registry

        def hist(name, doc, buckets):
            return Histogram(f"tokenmill:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token (s).", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens (s).", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token (s).", REQUEST_LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled (s).", REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "First scheduled to first token (s).",
                            REQUEST_LATENCY_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "First token to last token (s).", REQUEST_LATENCY_BUCKETS)
        self.inference = hist("request_inference_time_seconds", "First scheduled to last token (s).",
                              REQUEST_LATENCY_BUCKETS)
        self.req_prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.req_generation_tokens = hist("request_generation_tokens", "Generated tokens per request.",
                                          TOKEN_BUCKETS)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens scheduled per engine step.", TOKEN_BUCKETS)
        self.prompt_tokens = Counter("tokenmill:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("tokenmill:generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self._success = Counter("tokenmill:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.preemptions = Counter("tokenmill:num_preemptions", "Requests preempted (recomputed later).", labels,
                                   registry=r).labels(model_name)
        self.running = Gauge("tokenmill:num_requests_running", "Requests in the running batch.", labels,
                             registry=r).labels(model_name)
        self.waiting = Gauge("tokenmill:num_requests_waiting", "Requests waiting to be scheduled.", labels,
                             registry=r).labels(model_name)
        self.kv_usage = Gauge("tokenmill:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", labels,
                              registry=r).labels(model_name)
        self.kv_blocks_used = Gauge("tokenmill:kv_cache_blocks_used", "KV-cache blocks in use.", labels,
                                    registry=r).labels(model_name)

        # Prefix cache, in tokens (vLLM's names); the core sends cumulative totals, exported as counters.
        self.prefix_cache_queries = Counter("tokenmill:prefix_cache_queries", "Prompt tokens looked up in the "
                                            "prefix cache.", labels, registry=r).labels(model_name)
        self.prefix_cache_hits = Counter("tokenmill:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                         labels, registry=r).labels(model_name)
        self.prefill_cached_tokens = Counter("tokenmill:prefill_cached_tokens", "Prefill tokens served from the "
                                             "prefix cache.", labels, registry=r).labels(model_name)
        self.prefill_computed_tokens = Counter("tokenmill:prefill_computed_tokens", "Prefill tokens run through "
                                               "the model.", labels, registry=r).labels(model_name)
        self._cumulative_seen: dict[str, int] = {}

        # Engine steps (one observation per step the core ran; device times when they complete).
        self.step_gpu_time = hist("step_gpu_time_seconds", "Device time of a step's forward + sampling (CUDA "
                                  "events on a GPU, wall time on the CPU) (s).", STEP_TIME_BUCKETS)
        self.step_idle = hist("step_idle_seconds", "Device idle gap between back-to-back steps (s).",
                              STEP_IDLE_BUCKETS)
        self.step_scheduling = hist("step_scheduling_time_seconds", "Host time in the scheduler per step (s).",
                                    STEP_TIME_BUCKETS)
        self.step_duration = hist("step_duration_seconds", "Host wall time of a whole engine step (s).",
                                  STEP_TIME_BUCKETS)
        self.step_batch_size = hist("step_batch_size", "Requests in a step.", BATCH_BUCKETS)
        self.step_prefill_tokens = hist("step_prefill_tokens", "Prefill tokens in a step.", STEP_TOKEN_BUCKETS)
        self.step_decode_tokens = hist("step_decode_tokens", "Decode tokens in a step.", STEP_TOKEN_BUCKETS)
        self.step_kv_usage = hist("step_kv_cache_usage_perc", "Fraction of KV-cache blocks in use after a step "
                                  "(0-1).", KV_USAGE_BUCKETS)
        self.gpu_busy = Gauge("tokenmill:gpu_busy_fraction", "Step device time / (device time + idle gaps) over "
                              "the steps of the last 10 s: the share of loaded wall time the device computed.",
                              labels, registry=r).labels(model_name)
        self.detokenize = hist("request_detokenize_time_seconds", "API-process time turning a request's tokens "
                               "into text (detokenization, stop strings, logprob dicts) (s).", DETOKENIZE_BUCKETS)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.live.observe_finished()

    def observe_ttft(self, seconds: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.live.observe_ttft(seconds)
        self.live.observe_tokens(prompt=num_prompt_tokens)

    def observe_tokens(self, count: int, itl: float | None) -> None:
        """`count` new tokens of one sequence; `itl` the gap per token since its previous output."""
        if itl is not None:
            for _ in range(count):
                self.itl.observe(itl)
                self.live.observe_itl(itl)
        self.generation_tokens.inc(count)
        self.live.observe_tokens(generated=count)

    def sample_live(self) -> dict:
        """One dashboard point (every second, from the server's sampling task); updates the busy gauge."""
        point = self.live.sample()
        if point["gpu_busy"] is not None:
            self.gpu_busy.set(point["gpu_busy"])
        return point

    def record_stats(self, stats: SchedulerStats, num_blocks: int) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_blocks_used.set(round(stats.kv_cache_usage * num_blocks))
        if stats.num_preemptions:
            self.preemptions.inc(stats.num_preemptions)
        for name in ("prefix_cache_queries", "prefix_cache_hits", "prefill_cached_tokens", "prefill_computed_tokens"):
            total = getattr(stats, name)
            delta = total - self._cumulative_seen.get(name, 0)
            if delta > 0:
                getattr(self, name).inc(delta)
            self._cumulative_seen[name] = total
        scheduled = stats.num_prefill_tokens + stats.num_decode_tokens
        if scheduled:
            self.iteration_tokens.observe(scheduled)
        for seconds in stats.step_device_times:
            self.step_gpu_time.observe(seconds)
        for seconds in stats.step_idle_times:
            self.step_idle.observe(seconds)
        if stats.step_duration is not None:
            self.step_duration.observe(stats.step_duration)
            self.step_scheduling.observe(stats.step_scheduling_time or 0.0)
            self.step_batch_size.observe(stats.step_batch_size)
            self.step_prefill_tokens.observe(stats.num_prefill_tokens)
            self.step_decode_tokens.observe(stats.num_decode_tokens)
            self.step_kv_usage.observe(stats.kv_cache_usage)
        self.live.record_stats(stats)

    def render(self) -> bytes:
        return generate_latest(self.registry)
