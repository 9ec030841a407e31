"""Iteration-level scheduler: continuous batching under one token budget per step.

There are no prefill and decode phases: each request has `num_computed_tokens` of its
`all_token_ids` in the KV cache, and a step gives it up to the rest (a chunk of a long prompt,
the one new token of a decode, or 1 + k tokens when k draft tokens are to be verified). Running
requests go first, in arrival order; waiting requests join while budget, sequence slots and KV
blocks last. When a running request cannot get a block, the most recently arrived running request
is preempted: its blocks are freed and it is recomputed later from its prompt and the tokens it had
produced, so its output does not change.

Prefix caching: when a waiting request (new, or preempted and resumed) is admitted, the KV-cache
manager looks up the longest cached prefix of its full blocks; those tokens count as computed and
only the rest is scheduled. Every admission counts as one prefix-cache query of all the request's
tokens (`SchedulerStats.prefix_cache_queries` / `prefix_cache_hits`, cumulative).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.messages import EngineCoreOutput, SchedulerStats, TokenLogprobs
from tokenmill.engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `request`, starting at position `start`, to run this step."""

    request: Request
    start: int
    num_tokens: int
    block_ids: list[int]
    samples: bool  # the chunk reaches the end of the request's tokens, so it yields the next token

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of this chunk below the request's prefill end (the rest are decode tokens)."""
        return max(0, min(self.start + self.num_tokens, self.request.num_prefill_tokens) - self.start)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests that left the engine since the last step: the runner drops their per-request state.
    finished_request_ids: set[str] = field(default_factory=set)
    num_preemptions: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class SampledToken:
    """What the model runner produced for one sampling chunk."""

    token_id: int
    logprobs: TokenLogprobs | None = None


class Scheduler:
    """Owns the waiting and running queues and the KV-cache manager."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        # Cumulative counters (see SchedulerStats).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prefill_computed_tokens = 0

    # ---- queue management -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """End requests from outside the step (abort, stop string): free their blocks now."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- one step ---------------------------------------------------------------------------

    def schedule_step(self) -> SchedulerOutput:
        """Choose the tokens to run this step."""
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self._awaiting_finish(request):
                index += 1
                continue
            num_new = min(request.num_tokens + len(request.spec_token_ids) - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preemptions += 1
                if victim is request:
                    break
            else:
                out.chunks.append(self._chunk(request, num_new))
                budget -= num_new
                index += 1

        # Admit waiting requests only in a step without preemption: blocks are short.
        while self.waiting and budget > 0 and not out.num_preemptions \
                and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            # A waiting request holds no blocks (num_computed_tokens is 0): reuse what is cached.
            computed_blocks, num_cached = self.kv.get_computed_blocks(request) \
                if self.config.enable_prefix_caching else ([], 0)
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            request.num_prefill_tokens = request.num_tokens
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            if self.config.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_cached
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
        for chunk in out.chunks:
            self.prefill_computed_tokens += chunk.num_prefill_tokens
        return out

    def _awaiting_finish(self, request: Request) -> bool:
        """Async scheduling: the tokens being sampled for it already reach max_tokens or
        max_model_len, so it finishes when they arrive; scheduling it again would be wasted."""
        if not request.num_pending_tokens:
            return False
        max_tokens = request.sampling_params.max_tokens
        return (max_tokens is not None and request.num_output_tokens >= max_tokens) \
            or request.num_tokens >= self.config.max_model_len

    def mark_launched(self, scheduled: SchedulerOutput) -> None:
        """The step is queued on the device: its tokens count as computed, and each sampling chunk's
        next token is a placeholder until `update_from_output` gets its id. With async scheduling the
        next step is scheduled before that happens (its decode rows then compute the placeholders,
        whose ids the model runner reads from this step's result on the device)."""
        for chunk in scheduled.chunks:
            request = chunk.request
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            if chunk.samples:
                request.append_placeholder()

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(request, start, num_new, self.kv.get_block_table(request.request_id),
                              samples=start + num_new >= request.num_tokens)

    def update_from_output(self, scheduled: SchedulerOutput,
                           sampled: list[SampledToken | None]) -> list[EngineCoreOutput]:
        """Fill in the tokens a launched step (see `mark_launched`) sampled and stop requests that
        hit EOS, a stop token, max_tokens or max_model_len. A request preempted since the step was
        launched keeps its token (it is recomputed with it); one that finished meanwhile (abort,
        stop string, or a stop found in the previous step's result) ignores it."""
        outputs = []
        now = time.monotonic()
        for chunk, token in zip(scheduled.chunks, sampled):
            request = chunk.request
            if token is None or request.status.finished:
                continue
            index = request.resolve_placeholder(token.token_id)
            first = request.first_token_time is None
            if first:
                request.first_token_time = now
            status = self._check_stop(request, token.token_id, index + 1)
            if status is not None:
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                else:
                    self.waiting.remove(request)
                self._finish(request, status)
            outputs.append(EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[token.token_id],
                new_logprobs=[token.logprobs] if token.logprobs is not None else None,
                finish_reason=status.value if status is not None else None,
                stop_reason=request.stop_reason,
                num_cached_tokens=request.num_cached_tokens or 0,
                scheduled_time=request.scheduled_time if first else None,
            ))
        return outputs

    def _check_stop(self, request: Request, token_id: int, num_output: int) -> RequestStatus | None:
        """Stop after `token_id`, the request's `num_output`-th output token?"""
        params = request.sampling_params
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_prompt_tokens + num_output >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stats(self, num_preemptions: int = 0, scheduled: SchedulerOutput | None = None) -> SchedulerStats:
        stats = SchedulerStats(num_running=len(self.running), num_waiting=len(self.waiting),
                               kv_cache_usage=self.kv.usage, num_preemptions=num_preemptions,
                               prefix_cache_queries=self.prefix_cache_queries,
                               prefix_cache_hits=self.prefix_cache_hits,
                               prefill_cached_tokens=self.prefix_cache_hits,
                               prefill_computed_tokens=self.prefill_computed_tokens)
        if scheduled is not None:
            for chunk in scheduled.chunks:
                prefill = chunk.num_prefill_tokens
                stats.num_prefill_tokens += prefill
                stats.num_decode_tokens += chunk.num_tokens - prefill
        return stats
