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
    # for metrics
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_tokens: int = 0


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
               *, arrival_time: float | None = None, cache_salt: str | None = None) -> RequestStream:
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
        stream = RequestStream(request_id, arrival, len(prompt_token_ids))
        children = params.per_sequence()
        core_ids = self.output_processor.add_request(request_id, prompt, prompt_token_ids, children)
        self.streams[request_id] = stream
        eos = tuple(self.model_config.eos_token_ids)
        try:
            for core_id, child in zip(core_ids, children):
                self.client.add_request(EngineCoreRequest(core_id, prompt_token_ids, child, eos, arrival,
                                                          cache_salt))
        except EngineDeadError:
            self._forget(request_id)
            raise
        if self.request_log is not None:
            self.request_log.add_request(request_id, prompt_token_ids, arrival, cache_salt)
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
        if request_id not in self.streams:
            return
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
        if self.metrics is not None:
            self._record_token_metrics(batch, now)  # before processing forgets finished sequences
        outputs, stopped = self.output_processor.process_outputs(batch.outputs)
        if stopped:
            self.client.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.request_log is not None:
            self.request_log.observe(outputs)
        if self.metrics is not None:
            if batch.stats is not None:
                self.last_stats = batch.stats
                self.metrics.record_stats(batch.stats, self.num_kv_blocks)
        for output in outputs:
            stream = self.streams.get(output.request_id)
            if stream is None:
                continue
            stream.latest = output
            stream.event.set()
            if output.finished:
                self.streams.pop(output.request_id, None)
                if self.metrics is not None:
                    self._record_finished(stream, output, now)

    def _record_token_metrics(self, batch: EngineCoreOutputs, now: float) -> None:
        for out in batch.outputs:
            entry = self.output_processor.sequences.get(out.request_id)
            stream = self.streams.get(entry[0].request_id) if entry else None
            if stream is None:
                continue
            if out.scheduled_time is not None and stream.scheduled_time is None:
                stream.scheduled_time = out.scheduled_time
            count = len(out.new_token_ids)
            if stream.first_token_time is None:
                stream.first_token_time = now
                self.metrics.ttft.observe(now - stream.arrival_time)
                self.metrics.prompt_tokens.inc(stream.num_prompt_tokens)
            elif stream.last_token_time is not None:
                for _ in range(count):
                    self.metrics.itl.observe((now - stream.last_token_time) / count)
            stream.last_token_time = now
            stream.num_tokens += count
            self.metrics.generation_tokens.inc(count)

    def _record_finished(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        m = self.metrics
        m.e2e.observe(now - stream.arrival_time)
        scheduled = stream.scheduled_time or stream.arrival_time
        first = stream.first_token_time or now
        m.queue.observe(max(0.0, scheduled - stream.arrival_time))
        m.prefill.observe(max(0.0, first - scheduled))
        m.decode.observe(max(0.0, now - first))
        m.inference.observe(max(0.0, now - scheduled))
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
