"""The engine core: scheduler + model runner in a step loop. Token ids in, token ids out.

It knows nothing of text: tokenization, detokenization and stop strings belong to the front end
(`LLMEngine`), which talks to it only through the messages in `engine/messages.py`, so the core
can run in its own process without change.
"""

from __future__ import annotations

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
        # One INFO line per request when it arrives and when it leaves, tagged with its trace id
        # (the server turns this on; offline LLM.generate keeps it off). Not per step.
        self.log_requests = False
        self._traced: dict[str, tuple[str, Request]] = {}
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
                    request.num_cached_tokens or 0, request.num_output_tokens, request.num_preemptions,
                    "-" if queue is None else f"{queue * 1e3:.1f} ms", (now - request.arrival_time) * 1e3,
                    extra={"request_id": trace, "fields": {
                        "engine_request_id": request_id, "finish_reason": reason,
                        "prompt_tokens": request.num_prompt_tokens,
                        "cached_prompt_tokens": request.num_cached_tokens or 0,
                        "output_tokens": request.num_output_tokens, "preemptions": request.num_preemptions,
                        "queue_ms": None if queue is None else round(queue * 1e3, 3),
                        "engine_ms": round((now - request.arrival_time) * 1e3, 3)}})

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """Schedule, run the model, update the requests. Returns the new tokens of this step, with
        the engine's state and the step's timings in `stats`."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule_step()
        scheduling = time.perf_counter() - start
        sampled = self.runner.execute(scheduled)
        outputs = self.scheduler.update_from_output(scheduled, sampled)
        self.total_preemptions += scheduled.num_preemptions
        if self._traced:
            for out in outputs:
                if out.finish_reason is not None:
                    self._log_finished(out.request_id, out.finish_reason)
        stats = self.scheduler.stats(scheduled.num_preemptions, scheduled)
        stats.step_batch_size = len(scheduled.chunks)
        stats.step_scheduling_time = scheduling
        stats.step_device_times, stats.step_idle_times = self.runner.step_timer.collect()
        stats.device_timing = self.runner.step_timer.kind
        stats.step_duration = time.perf_counter() - start
        return EngineCoreOutputs(outputs=outputs, stats=stats)
