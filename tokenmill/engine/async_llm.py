"""The front end of a server: tokenization, detokenization and per-request streams in the API
process, with the engine core running in its own process (`core_process.py`).

`generate()` is an async iterator of cumulative `RequestOutput`s for one request. Outputs from
the core are detokenized on the event loop as they arrive; a slow consumer only ever sees the
latest state (no unbounded queue). Cancelling the iterator (client disconnect) aborts the request
in the core, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.core_process import EngineCoreClient, EngineDeadError
from tokenmill.engine.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.validation import validate_request
from tokenmill.errors import InvalidRequestError
from tokenmill.ops.request_log import RequestLog
from tokenmill.ops.tracing import request_logging_enabled
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Sampling defaults a model may set in generation_config.json (vLLM's --generation-config auto).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class OverloadedError(RuntimeError):
    """Too many requests in flight; the caller should retry later."""


@dataclass
class RequestStream:
    """Where the latest state of one request waits for its consumer."""

    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    latest: RequestOutput | None = None
    error: Exception | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    trace_id: str | None = None  # X-Request-Id (or the request id): named on its log lines
    # for metrics and the response's timing breakdown (monotonic seconds)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    detokenize_s: float = 0.0  # API-process time in the output processor for this request
    num_cached_tokens: int = 0
    num_tokens: int = 0
    finish_reason: str | None = None

    def timing(self) -> dict:
        """Milliseconds: queue (arrival to first scheduled), prefill (first scheduled to first
        token), decode (first to last token), detokenize (API-process output processing, which
        runs while decoding), e2e (arrival to last token); and the prompt tokens the prefix cache
        served. Times not reached yet are None."""
        return request_timing([self])


def request_timing(streams: list[RequestStream]) -> dict:
    """The timing breakdown of one API call: over all its prompts' streams (first scheduled, first
    token, last finish; detokenize time and cached tokens summed)."""

    def ms(a, b):
        return None if a is None or b is None else round(max(0.0, b - a) * 1e3, 3)

    arrival = min(s.arrival_time for s in streams)
    scheduled = min((s.scheduled_time for s in streams if s.scheduled_time is not None), default=None)
    first = min((s.first_token_time for s in streams if s.first_token_time is not None), default=None)
    finished = [s.finish_time for s in streams]
    finish = max(finished) if all(t is not None for t in finished) else None
    return {"queue_ms": ms(arrival, scheduled), "prefill_ms": ms(scheduled, first),
            "cached_prompt_tokens": sum(s.num_cached_tokens for s in streams), "decode_ms": ms(first, finish),
            "detokenize_ms": round(sum(s.detokenize_s for s in streams) * 1e3, 3), "e2e_ms": ms(arrival, finish)}


def timing_header(timing: dict) -> str:
    """`queue_ms=1.2;prefill_ms=30.5;...` (the X-Tokenmill-Timing header)."""
    return ";".join(f"{k}={'' if v is None else v}" for k, v in timing.items())


class AsyncLLM:
    def __init__(self, config: EngineConfig, *, max_queued_requests: int = 1024, metrics=None):
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = Tokenizer(Path(config.tokenizer or config.model))
        self.generation_defaults = _generation_defaults(Path(config.model))
        self.client = EngineCoreClient(config)
        self.max_model_len = self.client.ready.max_model_len
        self.kv_capacity_tokens = self.client.ready.kv_capacity_tokens
        self.num_kv_blocks = self.client.ready.num_kv_blocks
        self.max_in_flight = config.max_num_seqs + max_queued_requests
        self.output_processor = OutputProcessor(self.tokenizer)
        self.streams: dict[str, RequestStream] = {}
        self.metrics = metrics
        self.request_log = RequestLog(config.request_log_path, config.request_log_max_bytes,
                                      config.request_log_backup_count) if config.request_log_path else None
        self.last_stats = SchedulerStats()
        self.log_requests = request_logging_enabled()  # per-request INFO lines (TOKENMILL_LOG_REQUESTS=0: off)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin consuming outputs; call from the event loop that serves requests."""
        self._loop = asyncio.get_running_loop()
        self.client.start_output_thread(
            lambda outputs: self._loop.call_soon_threadsafe(self._process, outputs),
            lambda reason: self._loop.call_soon_threadsafe(self._fail_all, reason))

    def shutdown(self) -> None:
        self.client.close()

    @property
    def healthy(self) -> bool:
        return not self.client.dead

    @property
    def num_in_flight(self) -> int:
        return len(self.streams)

    # ---- requests -----------------------------------------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Off the event loop: a long prompt must not stall the streams of others."""
        return await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.encode, text,
                                                                add_special_tokens)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, max_model_len=self.max_model_len,
                         vocab_size=self.model_config.vocab_size)

    def submit(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
               *, arrival_time: float | None = None, cache_salt: str | None = None,
               trace_id: str | None = None) -> RequestStream:
        """Validate and send a request to the core. Raises at once (bad input, overload, dead engine)."""
        if not self.healthy:
            raise EngineDeadError(self.client.death_reason)
        if len(self.streams) >= self.max_in_flight:
            raise OverloadedError(f"server overloaded: {len(self.streams)} requests in flight "
                                  f"(limit {self.max_in_flight} = max_num_seqs + max_queued_requests)")
        if request_id in self.streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self.validate(prompt_token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, arrival, len(prompt_token_ids), trace_id=trace_id or request_id)
        children = params.per_sequence()
        core_ids = self.output_processor.add_request(request_id, prompt, prompt_token_ids, children)
        self.streams[request_id] = stream
        eos = tuple(self.model_config.eos_token_ids)
        try:
            for core_id, child in zip(core_ids, children):
                self.client.add_request(EngineCoreRequest(core_id, prompt_token_ids, child, eos, arrival,
                                                          cache_salt, trace_id=stream.trace_id))
        except EngineDeadError:
            self._forget(request_id)
            raise
        if self.request_log is not None:
            self.request_log.add_request(request_id, prompt_token_ids, arrival, cache_salt)
        if self.log_requests:
            logger.info("request %s submitted: %d prompt tokens, n=%d, max_tokens %s", request_id,
                        len(prompt_token_ids), len(children), params.max_tokens,
                        extra={"request_id": stream.trace_id})
        return stream

    async def outputs(self, stream: RequestStream, timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of a submitted request, the last one finished. Leaving early (an
        exception, cancellation, the timeout) aborts the request."""
        deadline = None if timeout is None else stream.arrival_time + timeout
        finished = False
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(stream.event.wait(), remaining)
                stream.event.clear()
                if stream.error is not None:
                    raise stream.error
                output = stream.latest
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            if not finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (client gone, timeout); its KV blocks are freed in the core."""
        stream = self.streams.get(request_id)
        if stream is None:
            return
        if self.log_requests:
            logger.info("request %s aborted after %d output tokens (%.1f ms)", request_id, stream.num_tokens,
                        (time.monotonic() - stream.arrival_time) * 1e3, extra={"request_id": stream.trace_id})
        core_ids = self.output_processor.core_request_ids(request_id)
        output = self.output_processor.abort(request_id)
        if self.request_log is not None and output is not None:
            self.request_log.observe([output])
        self._forget(request_id)
        try:
            self.client.abort_requests(core_ids)
        except EngineDeadError:
            pass
        if self.metrics is not None:
            self.metrics.finished("abort")

    def _forget(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        self.output_processor.requests.pop(request_id, None)

    # ---- outputs (on the event loop) -------------------------------------------------------------

    def _process(self, batch: EngineCoreOutputs) -> None:
        now = time.monotonic()
        if batch.stats is not None:
            self.last_stats = batch.stats
            if self.metrics is not None:
                self.metrics.record_stats(batch.stats, self.num_kv_blocks)
        # One request at a time, so each one's output-processing (detokenize) time is its own.
        groups: dict[str, list] = {}
        for out in batch.outputs:
            entry = self.output_processor.sequences.get(out.request_id)
            if entry is not None:  # else finished here already (stop string) while the core ran on
                groups.setdefault(entry[0].request_id, []).append(out)
        all_outputs, stopped = [], []
        for request_id, core_outputs in groups.items():
            stream = self.streams.get(request_id)
            if stream is not None:
                self._note_tokens(stream, core_outputs, now)
            start = time.perf_counter()
            outputs, stop = self.output_processor.process_outputs(core_outputs)
            if stream is not None:
                stream.detokenize_s += time.perf_counter() - start
            all_outputs.extend(outputs)
            stopped.extend(stop)
        if stopped:
            self.client.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.request_log is not None:
            self.request_log.observe(all_outputs)
        for output in all_outputs:
            stream = self.streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                # Before the consumer wakes: its last chunk carries the complete timing.
                stream.finish_time = now
                stream.num_cached_tokens = output.num_cached_tokens
                stream.finish_reason = ",".join(sorted({c.finish_reason or "abort" for c in output.outputs}))
                self.streams.pop(output.request_id, None)
                if self.log_requests:
                    self._log_finished(stream)
                if self.metrics is not None:
                    self._record_finished(stream, output, now)
            stream.latest = output
            stream.event.set()

    def _note_tokens(self, stream: RequestStream, core_outputs, now: float) -> None:
        for out in core_outputs:
            if out.scheduled_time is not None and stream.scheduled_time is None:
                stream.scheduled_time = out.scheduled_time
            count = len(out.new_token_ids)
            first = stream.first_token_time is None
            if first:
                stream.first_token_time = now
            if self.metrics is not None:
                if first:
                    self.metrics.observe_ttft(now - stream.arrival_time, stream.num_prompt_tokens)
                itl = (now - stream.last_token_time) / count \
                    if not first and stream.last_token_time is not None and count else None
                self.metrics.observe_tokens(count, itl)
            stream.last_token_time = now
            stream.num_tokens += count

    def _log_finished(self, stream: RequestStream) -> None:
        timing = stream.timing()
        logger.info("request %s finished (%s): %d prompt tokens (%d cached), %d output tokens; queue %s ms, "
                    "prefill %s ms, decode %s ms, detokenize %s ms, e2e %s ms", stream.request_id,
                    stream.finish_reason, stream.num_prompt_tokens, stream.num_cached_tokens, stream.num_tokens,
                    timing["queue_ms"], timing["prefill_ms"], timing["decode_ms"], timing["detokenize_ms"],
                    timing["e2e_ms"],
                    extra={"request_id": stream.trace_id, "fields": {
                        "engine_request_id": stream.request_id, "finish_reason": stream.finish_reason,
                        "prompt_tokens": stream.num_prompt_tokens, "output_tokens": stream.num_tokens, **timing}})

    def _record_finished(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        m = self.metrics
        m.e2e.observe(now - stream.arrival_time)
        scheduled = stream.scheduled_time or stream.arrival_time
        first = stream.first_token_time or now
        m.queue.observe(max(0.0, scheduled - stream.arrival_time))
        m.prefill.observe(max(0.0, first - scheduled))
        m.decode.observe(max(0.0, now - first))
        m.inference.observe(max(0.0, now - scheduled))
        m.detokenize.observe(stream.detokenize_s)
        m.req_prompt_tokens.observe(stream.num_prompt_tokens)
        m.req_generation_tokens.observe(stream.num_tokens)
        for completion in output.outputs:
            m.finished(completion.finish_reason or "abort")

    def _fail_all(self, reason: str) -> None:
        error = EngineDeadError(reason)
        for stream in list(self.streams.values()):
            stream.error = error
            stream.event.set()
        self.streams.clear()


def _generation_defaults(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not config.get("do_sample", True):
        return {}
    return {k: config[k] for k in GENERATION_DEFAULT_KEYS if k in config}
