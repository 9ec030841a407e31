"""The engine core: scheduler + model runner in a step loop. Token ids in, token ids out.

It knows nothing of text: tokenization, detokenization and stop strings belong to the front end
(`LLMEngine`), which talks to it only through the messages in `engine/messages.py`, so the core
can run in its own process without change.
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.messages import EngineCoreOutputs, EngineCoreRequest
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler, SchedulerConfig
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, engine_config: EngineConfig, model_config: ModelConfig | None = None):
        self.config = engine_config
        self.model_config = model_config or ModelConfig.from_pretrained(engine_config.model)
        self.device = engine_config.resolve_device()
        self.dtype = engine_config.resolve_dtype(self.model_config, self.device)
        self.max_model_len = engine_config.resolve_max_model_len(self.model_config)
        torch.manual_seed(engine_config.seed)
        self.runner = ModelRunner(self.model_config, engine_config, device=self.device, dtype=self.dtype,
                                  max_model_len=self.max_model_len)
        num_blocks = self.runner.determine_num_blocks()
        block_size = engine_config.block_size
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}), "
                f"fewer than max_model_len ({self.max_model_len}); give it more memory or lower max_model_len")
        self.runner.allocate_kv_cache(num_blocks)
        self.cuda_graph_capture_seconds = self.runner.capture_cuda_graphs()
        self.num_kv_blocks = num_blocks
        self.kv_capacity_tokens = num_blocks * block_size
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s on %s); "
                    "max concurrency at max_model_len %d: %.1fx",
                    num_blocks, block_size, self.kv_capacity_tokens,
                    num_blocks * self.runner.kv_bytes_per_block / 2**30, self.dtype, self.device,
                    self.max_model_len, self.kv_capacity_tokens / self.max_model_len)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=engine_config.max_num_seqs,
                            max_num_batched_tokens=engine_config.max_num_batched_tokens,
                            max_model_len=self.max_model_len,
                            enable_chunked_prefill=engine_config.enable_chunked_prefill,
                            enable_prefix_caching=engine_config.enable_prefix_caching),
            KVCacheManager(num_blocks, block_size, enable_prefix_caching=engine_config.enable_prefix_caching))
        self.total_preemptions = 0
        # Async scheduling (see `step`): the step queued on the device whose tokens are not read yet.
        self.async_scheduling = engine_config.resolve_async_scheduling(self.device)
        self._in_flight = None
        # One INFO line per request when it arrives and when it leaves, tagged with its trace id
        # (the server turns this on; offline LLM.generate keeps it off). Not per step.
        self.log_requests = False
        self._traced: dict[str, tuple[str, Request]] = {}
        # Start-up leaves many long-lived objects (modules, Triton's compiled kernels and launchers,
        # graph pools). Frozen, a full collection during serving does not walk them all: one stalled
        # the device for ~250 ms before a decode step (H200, 2026-12-01). vLLM's engine core freezes
        # its start-up heap for the same reason. The freeze is process-wide: whatever is alive now
        # (in-process, an earlier engine too) is exempt from cycle collection from here on, so code
        # that builds engine after engine in one process drops the old one (del + gc.collect())
        # before making the next, as the benchmarks do. Plain reference counting still frees it.
        gc.collect()
        gc.freeze()
        self.runner.step_timer.collect()  # drop anything start-up ran
        self.runner.step_timer.mark_idle()

    def add_request(self, request: EngineCoreRequest) -> None:
        core_request = Request(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params, eos_token_ids=request.eos_token_ids,
            arrival_time=request.arrival_time, cache_salt=request.cache_salt)
        self.scheduler.add_request(core_request)
        if self.log_requests:
            trace = request.trace_id or request.request_id
            self._traced[request.request_id] = (trace, core_request)
            logger.info("request %s queued: %d prompt tokens, max_tokens %s; %d running, %d waiting",
                        request.request_id, len(request.prompt_token_ids), request.sampling_params.max_tokens,
                        len(self.scheduler.running), len(self.scheduler.waiting), extra={"request_id": trace})

    def abort_requests(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(request_ids, status)
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            self._complete(*self._in_flight)  # only finished requests in it: nothing left to report
            self._in_flight = None
        if self.log_requests:
            for request_id in request_ids:
                self._log_finished(request_id, status.value)

    def idle(self) -> None:
        """The caller is about to wait for new requests (no step until one comes)."""
        self.runner.step_timer.mark_idle()

    def _log_finished(self, request_id: str, reason: str) -> None:
        traced = self._traced.pop(request_id, None)
        if traced is None:
            return
        trace, request = traced
        now = time.monotonic()
        queue = (request.scheduled_time - request.arrival_time) if request.scheduled_time else None
        logger.info("request %s finished (%s): %d prompt tokens (%d cached), %d output tokens, %d preemptions; "
                    "queue %s, in engine %.1f ms", request_id, reason, request.num_prompt_tokens,
                    request.num_cached_tokens or 0, request.num_output_tokens - request.num_pending_tokens,
                    request.num_preemptions,
                    "-" if queue is None else f"{queue * 1e3:.1f} ms", (now - request.arrival_time) * 1e3,
                    extra={"request_id": trace, "fields": {
                        "engine_request_id": request_id, "finish_reason": reason,
                        "prompt_tokens": request.num_prompt_tokens,
                        "cached_prompt_tokens": request.num_cached_tokens or 0,
                        "output_tokens": request.num_output_tokens - request.num_pending_tokens,
                        "preemptions": request.num_preemptions,
                        "queue_ms": None if queue is None else round(queue * 1e3, 3),
                        "engine_ms": round((now - request.arrival_time) * 1e3, 3)}})

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def _needs_sync(self) -> bool:
        """Penalties sample from a request's output history on the host: a step that has one with
        a pending token must wait for it, so such batches run synchronously."""
        return any(r.sampling_params.uses_penalties for r in self.scheduler.running)

    def step(self) -> EngineCoreOutputs:
        """Schedule, run the model, update the requests. Returns the tokens that became known in
        this call, with the engine's state and the step's timings in `stats`.

        With async scheduling, step N+1 is scheduled and queued on the device before step N's
        tokens are read back: the host's work (scheduling, input preparation, updating requests,
        sending outputs) overlaps the device's, and each call returns the previous step's tokens.
        Decode inputs not yet known are placeholders filled on the device; a request found finished
        in step N's tokens wastes its row of step N+1."""
        start = time.perf_counter()
        outputs = []
        overlap = self.async_scheduling and not self._needs_sync()
        if not overlap and self._in_flight is not None:
            outputs += self._complete(*self._in_flight)  # the scheduler needs every token first
            self._in_flight = None
        scheduling_start = time.perf_counter()
        scheduled = self.scheduler.schedule_step()
        scheduling = time.perf_counter() - scheduling_start
        self.total_preemptions += scheduled.num_preemptions
        previous = self._in_flight[1] if self._in_flight is not None else None
        launched = self.runner.launch(scheduled, previous)
        self.scheduler.mark_launched(scheduled)
        if self._in_flight is not None:
            outputs += self._complete(*self._in_flight)
            self._in_flight = None
        if overlap and not scheduled.is_empty:
            self._in_flight = (scheduled, launched)
        else:
            outputs += self._complete(scheduled, launched)
        stats = self.scheduler.stats(scheduled.num_preemptions, scheduled)
        stats.step_batch_size = len(scheduled.chunks)
        stats.step_scheduling_time = scheduling
        stats.step_device_times, stats.step_idle_times = self.runner.step_timer.collect()
        stats.device_timing = self.runner.step_timer.kind
        stats.step_duration = time.perf_counter() - start
        return EngineCoreOutputs(outputs=outputs, stats=stats)

    def _complete(self, scheduled, launched) -> list:
        """Wait for a launched step's tokens and hand them to the scheduler."""
        outputs = self.scheduler.update_from_output(scheduled, launched.result())
        if self._traced:
            for out in outputs:
                if out.finish_reason is not None:
                    self._log_finished(out.request_id, out.finish_reason)
        return outputs
