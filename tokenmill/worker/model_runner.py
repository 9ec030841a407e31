"""Runs one scheduled step on the device: builds the flat batch, runs the model, samples.

Owns the device-side state: the model, the KV-cache tensors and the seeded generators of
requests in flight. Takes a `SchedulerOutput`, returns one `SampledToken` (or None) per chunk.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.scheduler import SampledToken, ScheduledChunk, SchedulerOutput
from tokenmill.kernels import use_triton
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.models.loader import load_model
from tokenmill.ops.step_timer import StepTimer
from tokenmill.sample.sampler import Sampler, SamplingMetadata
from tokenmill.transfer import array_to_device, device_to_host_async, host_to_device
from tokenmill.worker.cuda_graphs import DecodeGraphs, default_capture_sizes

logger = logging.getLogger(__name__)


class LaunchedStep:
    """A step queued on the device. `tokens` (sampled ids, one row per sampling chunk, on the device)
    feed the next step's pending inputs; `result()` waits for them on the host."""

    def __init__(self, order: list[int], chunks: list[ScheduledChunk], tokens: torch.Tensor | None,
                 logprobs: list | None = None):
        self.order, self.chunks, self.tokens, self.logprobs = order, chunks, tokens, logprobs
        self.rows: dict[str, int] = {}
        self._host = self._ready = None
        if tokens is None:
            return
        self.rows = {c.request.request_id: row for row, c in enumerate(c for c in chunks if c.samples)}
        if tokens.is_cuda:  # start the copy now; result() then waits for this step only, not the next
            self._host = device_to_host_async(tokens)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self) -> list[SampledToken | None]:
        """One SampledToken (or None) per chunk, in the order of the scheduler's chunks."""
        results: list[SampledToken | None] = [None] * len(self.chunks)
        if self.tokens is not None:
            if self._ready is not None:
                self._ready.synchronize()
                token_list = self._host.tolist()
            else:
                token_list = self.tokens.tolist()
            row = 0
            for position, chunk in enumerate(self.chunks):
                if chunk.samples:
                    results[position] = SampledToken(token_list[row], self.logprobs[row] if self.logprobs else None)
                    row += 1
        unsorted: list[SampledToken | None] = [None] * len(self.chunks)
        for position, original in enumerate(self.order):
            unsorted[original] = results[position]
        return unsorted


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, *, device: torch.device,
                 dtype: torch.dtype, max_model_len: int):
        self.model_config = model_config
        self.engine_config = engine_config
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.block_size = engine_config.block_size
        self.model = load_model(engine_config.model, model_config, dtype=dtype, device=device,
                                max_positions=max_model_len, load_format=engine_config.load_format,
                                seed=engine_config.seed, kernel_backend=engine_config.kernel_backend,
                                fused_gemv=engine_config.resolve_fused_gemv(device))
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.decode_graphs: DecodeGraphs | None = None
        # Device time of each step's forward + sampling (CUDA events, read after the step's own
        # sync) and the idle gap between steps; EngineCore.step collects them into SchedulerStats.
        self.step_timer = StepTimer(device)
        if engine_config.fused_gemv is True and not use_triton(torch.empty(0, device=device), engine_config.kernel_backend):
            logger.warning("fused_gemv needs the Triton kernels, which kernel_backend=%r does not use on %s: "
                           "every step takes the general path", engine_config.kernel_backend, device)

    # ---- KV cache -------------------------------------------------------------------------------

    @property
    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * element

    def determine_num_blocks(self) -> int:
        """Blocks that fit: a fixed size on CPU, else what the memory budget leaves after a profile
        step at the largest batch (weights + activations + sampler)."""
        cfg = self.engine_config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, int(cfg.cpu_kv_cache_gib * 2**30) // self.kv_bytes_per_block)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        self._profile_run()
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = total * cfg.gpu_memory_utilization - peak - non_torch
        torch.cuda.empty_cache()
        if budget < self.kv_bytes_per_block:
            raise RuntimeError(
                f"no memory left for the KV cache: {total * cfg.gpu_memory_utilization / 2**30:.1f} GiB allowed "
                f"(gpu_memory_utilization={cfg.gpu_memory_utilization}), {peak / 2**30:.1f} GiB used by weights "
                f"and activations; raise gpu_memory_utilization or lower max_num_batched_tokens")
        return int(budget // self.kv_bytes_per_block)

    @torch.no_grad()
    def _profile_run(self) -> None:
        """The largest step the scheduler can produce: one prefill of the full token budget, then a
        sampler pass over max_num_seqs rows with top-k/top-p (the sort is its peak)."""
        num_tokens = min(self.engine_config.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        saved = self.kv_caches
        self.allocate_kv_cache(num_blocks)
        block_table = torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=block_table,
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens_cpu=[num_tokens], query_lens_cpu=[num_tokens], num_decodes=0)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, torch.arange(num_tokens, device=self.device), self.kv_caches, meta)
        rows = self.engine_config.max_num_seqs
        logits = self.model.compute_logits(hidden[:1].expand(rows, -1).contiguous())
        self.sampler(logits, _dummy_sampling_metadata(rows, logits.shape[1], self.device))
        torch.cuda.synchronize(self.device)
        self.kv_caches = saved

    def capture_cuda_graphs(self) -> float | None:
        """Capture decode graphs when they can run here (CUDA, Triton kernels, not enforce_eager).
        Returns the capture time in seconds, None when graphs are not used."""
        cfg = self.engine_config
        probe = self.kv_caches[0] if self.kv_caches else None
        if cfg.enforce_eager or probe is None or not probe.is_cuda or not use_triton(probe, cfg.kernel_backend):
            return None
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, capture_sizes=default_capture_sizes(
            cfg.max_num_seqs), max_model_len=self.max_model_len, block_size=self.block_size, device=self.device)
        return self.decode_graphs.capture()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        cfg = self.model_config
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]

    # ---- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def launch(self, scheduled: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step on the device without waiting for it. Input tokens that are still
        placeholders (async scheduling: sampled by `previous`, which is in flight) are read from
        `previous`'s token tensor on the device. The only host-device sync is `result()`."""
        for request_id in scheduled.finished_request_ids:
            self.generators.pop(request_id, None)
        if scheduled.is_empty:
            return LaunchedStep([], [], None)
        # Single-token chunks first: attention treats them as one batched decode group.
        order = sorted(range(len(scheduled.chunks)), key=lambda i: scheduled.chunks[i].num_tokens != 1)
        chunks = [scheduled.chunks[i] for i in order]
        input_ids, positions, meta, logits_rows = self._prepare_inputs(chunks, previous)
        self.step_timer.start()
        if self.decode_graphs is not None and meta.num_decodes == len(chunks) \
                and self.decode_graphs.can_run(len(chunks)):
            hidden = self.decode_graphs.run(input_ids, positions, meta.slot_mapping, meta.block_tables,
                                            meta.seq_lens)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampling_chunks = [c for c in chunks if c.samples]
        if not sampling_chunks:
            self.step_timer.stop()
            return LaunchedStep(order, chunks, None)
        all_rows = len(sampling_chunks) == len(chunks) == hidden.shape[0]  # pure decode: no gather
        rows = hidden if all_rows else hidden[logits_rows]
        if all(_plain_greedy(c) for c in sampling_chunks):
            # No per-row tensors to build, and no float32 copy of the logits to write and read back.
            tokens, logprobs = self.model.compute_logits(rows, float32=False).argmax(dim=-1), None
        else:
            logits = self.model.compute_logits(rows)
            tokens, logprobs = self.sampler(logits, self._sampling_metadata(sampling_chunks, logits.shape[1]))
        self.step_timer.stop()
        return LaunchedStep(order, chunks, tokens, logprobs)

    def _prepare_inputs(self, chunks: list[ScheduledChunk], previous: LaunchedStep | None = None):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens, query_lens, query_start = [], [], [0]
        logits_rows = []
        pending_at, pending_rows = [], []  # input positions holding a placeholder, rows of previous.tokens
        block_size = self.block_size
        for chunk in chunks:
            end = chunk.start + chunk.num_tokens
            request = chunk.request
            if request.num_pending_tokens and end > request.num_known_tokens:
                # At most one token is pending: the one the step in flight samples for this request.
                if previous is None or request.request_id not in previous.rows \
                        or request.num_pending_tokens != 1:
                    raise RuntimeError(f"request {request.request_id}: input token pending without the "
                                       "step that samples it")
                pending_at.append(len(input_ids) + request.num_known_tokens - chunk.start)
                pending_rows.append(previous.rows[request.request_id])
            table = chunk.block_ids
            if chunk.num_tokens == 1:   # a decode: most chunks of a big batch, so no per-token generators
                p = chunk.start
                input_ids.append(request.all_token_ids[p])
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            else:
                input_ids.extend(request.all_token_ids[chunk.start:end])
                positions.extend(range(chunk.start, end))
                slots.extend(table[p // block_size] * block_size + p % block_size for p in range(chunk.start, end))
            seq_lens.append(end)
            query_lens.append(chunk.num_tokens)
            query_start.append(query_start[-1] + chunk.num_tokens)
            if chunk.samples:
                logits_rows.append(query_start[-1] - 1)
        # Two host-to-device copies per step (one per dtype), from pinned memory without a sync,
        # instead of one blocking copy per tensor. The int32 one (seq lens, query starts, the padded
        # block tables: most of the step's input bytes) is filled in numpy, row by row.
        num_tokens, num_reqs, num_rows = len(input_ids), len(chunks), len(logits_rows)
        max_blocks = max(len(c.block_ids) for c in chunks)
        packed = np.zeros(2 * num_reqs + 1 + num_reqs * max_blocks, dtype=np.int32)
        packed[:num_reqs] = seq_lens
        packed[num_reqs:2 * num_reqs + 1] = query_start
        tables = packed[2 * num_reqs + 1:].reshape(num_reqs, max_blocks)
        for row, chunk in enumerate(chunks):
            tables[row, :len(chunk.block_ids)] = chunk.block_ids
        longs = host_to_device(input_ids + positions + slots + logits_rows + pending_at + pending_rows, torch.long,
                               self.device)
        ints = array_to_device(packed, self.device)
        ids = longs[:num_tokens]
        if pending_at:   # on the device, in stream order after the step that samples them
            tail = longs[3 * num_tokens + num_rows:]
            ids.index_copy_(0, tail[:len(pending_at)], previous.tokens.index_select(0, tail[len(pending_at):]))
        meta = AttentionMetadata(
            slot_mapping=longs[2 * num_tokens:3 * num_tokens],
            block_tables=ints[2 * num_reqs + 1:].view(num_reqs, max_blocks),
            seq_lens=ints[:num_reqs],
            query_start_loc=ints[num_reqs:2 * num_reqs + 1],
            seq_lens_cpu=seq_lens, query_lens_cpu=query_lens,
            num_decodes=sum(1 for n in query_lens if n == 1))
        return ids, longs[num_tokens:2 * num_tokens], meta, longs[3 * num_tokens:3 * num_tokens + num_rows]

    def _sampling_metadata(self, chunks: list[ScheduledChunk], vocab_size: int) -> SamplingMetadata:
        dev = self.device
        params = [c.request.sampling_params for c in chunks]
        generators = {}
        banned = []
        for row, chunk in enumerate(chunks):
            request, sp = chunk.request, params[row]
            if sp.seed is not None and not sp.greedy:
                gen = self.generators.get(request.request_id)
                if gen is None:
                    gen = self.generators[request.request_id] = torch.Generator(device=dev).manual_seed(sp.seed)
                generators[row] = gen
            if request.num_output_tokens < sp.min_tokens:
                stop_ids = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(request.eos_token_ids))
                stop_ids = [t for t in stop_ids if t < vocab_size]
                if stop_ids:
                    banned.append((row, stop_ids))
        uses_rep = any(sp.repetition_penalty != 1.0 for sp in params)
        uses_freq = any(sp.frequency_penalty != 0.0 for sp in params)
        uses_pres = any(sp.presence_penalty != 0.0 for sp in params)

        def padded(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(x) for x in lists))
            return host_to_device([x + [vocab_size] * (width - len(x)) for x in lists], torch.long, dev)

        def floats(values) -> torch.Tensor:
            return host_to_device(values, torch.float32, dev)

        def known_outputs(request) -> list[int]:   # without the placeholders of a step in flight
            return request.output_token_ids[:request.num_output_tokens - request.num_pending_tokens]

        any_penalty = uses_rep or uses_freq or uses_pres
        num_logprobs = [sp.logprobs for sp in params]
        requested = [n for n in num_logprobs if n is not None]
        return SamplingMetadata(
            temperature=floats([sp.temperature for sp in params]),
            greedy=host_to_device([sp.greedy for sp in params], torch.bool, dev),
            top_k=host_to_device([sp.top_k if sp.top_k > 0 else vocab_size for sp in params], torch.long, dev),
            top_p=floats([sp.top_p for sp in params]),
            min_p=floats([sp.min_p for sp in params]),
            all_greedy=all(sp.greedy for sp in params),
            needs_top_k_top_p=any(not sp.greedy and (sp.top_k > 0 or sp.top_p < 1.0) for sp in params),
            needs_min_p=any(not sp.greedy and sp.min_p > 0 for sp in params),
            generators=generators,
            repetition_penalty=floats([sp.repetition_penalty for sp in params]) if uses_rep else None,
            frequency_penalty=floats([sp.frequency_penalty for sp in params]) if uses_freq else None,
            presence_penalty=floats([sp.presence_penalty for sp in params]) if uses_pres else None,
            prompt_token_ids=padded([c.request.prompt_token_ids for c in chunks]) if uses_rep else None,
            output_token_ids=padded([known_outputs(c.request) for c in chunks]) if any_penalty else None,
            banned_tokens=banned,
            max_num_logprobs=max(requested) if requested else None,
            num_logprobs=num_logprobs,
        )


def _plain_greedy(chunk: ScheduledChunk) -> bool:
    """Greedy with nothing that changes or reports the distribution: argmax is the whole sampler."""
    sp = chunk.request.sampling_params
    return (sp.greedy and sp.logprobs is None and not sp.uses_penalties
            and chunk.request.num_output_tokens >= sp.min_tokens)


def _dummy_sampling_metadata(rows: int, vocab_size: int, device: torch.device) -> SamplingMetadata:
    ones = torch.ones(rows, device=device)
    return SamplingMetadata(
        temperature=ones, greedy=torch.zeros(rows, dtype=torch.bool, device=device),
        top_k=torch.full((rows,), 50, device=device), top_p=ones * 0.9, min_p=ones * 0.1,
        all_greedy=False, needs_top_k_top_p=True, needs_min_p=True, generators={},
        repetition_penalty=None, frequency_penalty=None, presence_penalty=None,
        prompt_token_ids=None, output_token_ids=None, banned_tokens=[],
        max_num_logprobs=None, num_logprobs=[None] * rows)
