"""Typed messages between the front end (tokenize, detokenize, stop strings) and the engine core
(schedule, run the model, sample). Plain data, so they can cross a process boundary as they are."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float
    # Requests with different salts never share prefix-cache blocks (vLLM's cache_salt).
    cache_salt: str | None = None
    # The client's X-Request-Id (or one the server made up): the core names it on its log lines.
    trace_id: str | None = None


@dataclass
class TokenLogprobs:
    """Logprobs for one generated token: the sampled one (with its rank) and the top-N."""

    sampled_logprob: float
    sampled_rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class EngineCoreOutput:
    """New tokens of one request from one step; `finish_reason` set on its last output."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # On the first output: when the request was first scheduled (monotonic, same clock in every
    # process on the host), so the front end can split queue time from prefill time.
    scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    """Engine-wide state after a step, for metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0  # during this step
    # Tokens scheduled this step. Prefill: positions the request had when it was (last) admitted,
    # i.e. its prompt, or prompt + outputs recomputed after a preemption; decode: the rest.
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # Prefix cache: cumulative totals since the engine started (counters; take differences or a
    # rate for per-interval values). A query is one admission of a waiting request (resumes after
    # preemption included) and counts all its tokens; a hit counts those found cached. All zero
    # when prefix caching is off.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Cumulative prefill tokens served from the cache (== prefix_cache_hits) and run through the
    # model (the sum of every step's num_prefill_tokens); together all prefill tokens.
    prefill_cached_tokens: int = 0
    prefill_computed_tokens: int = 0
    # ---- the step these stats come with (all unset when no step ran, e.g. after aborts) ----
    step_batch_size: int = 0  # requests (chunks) in the step
    step_scheduling_time: float | None = None  # host seconds in Scheduler.schedule_step
    step_duration: float | None = None  # host seconds of the whole EngineCore.step (wall)
    # Device timings that completed since the previous stats (usually one entry; on CUDA a step
    # whose events were not yet done when it returned shows up with the next one). Seconds.
    # step_device_times: forward + sampling of a step, from CUDA events on the GPU, wall time on
    # the CPU. step_idle_times: the device's gap between the end of one step's forward+sampling
    # and the start of the next one's, only between back-to-back steps (not across idle periods).
    step_device_times: list[float] = field(default_factory=list)
    step_idle_times: list[float] = field(default_factory=list)
    device_timing: str = ""  # "cuda_events" | "wall"


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput] = field(default_factory=list)
    stats: SchedulerStats | None = None
