"""CUDA graphs for pure-decode steps (every scheduled request runs one token).

A decode step of an 8B model is ~400 small kernels; launched one by one from Python the GPU
idles between them. At start-up the model's forward is captured once per batch size in
`capture_sizes`, reading its inputs from static buffers; a step with B decodes copies its inputs
into the buffers of the smallest captured size >= B (padding rows: slot -1, so no KV write, and
seq_len 0, so attention writes zeros) and replays that graph. Needs the Triton kernels: the
attention grid is sized by max_model_len so it is the same for every step (kernels exit early
past a request's end).
"""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32))
    return [s for s in sizes if s <= max_num_seqs] or [1]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], *, capture_sizes: list[int], max_model_len: int,
                 block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(capture_sizes)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        self.device = device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((self.max_bs, max_blocks), dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(self.max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens_cpu=[1] * bs, query_lens_cpu=[1] * bs,
            num_decodes=bs, max_decode_seq_len=self.max_model_len)

    @torch.no_grad()
    def capture(self) -> float:
        """Capture one graph per size (largest first, so smaller ones reuse its memory pool)."""
        start = time.perf_counter()
        pool = None
        for bs in reversed(self.sizes):
            meta = self._metadata(bs)
            args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta)
            self.model(*args)  # warm-up: compiles kernels, settles allocations
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured CUDA graphs for %d decode batch sizes (1..%d) in %.2f s", len(self.sizes),
                    self.max_bs, self.capture_seconds)
        return self.capture_seconds

    def can_run(self, num_decodes: int) -> bool:
        return 0 < num_decodes <= self.max_bs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """One decode step for B requests (tensors already on the device); returns hidden [B, H]."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.seq_lens[:n].copy_(seq_lens)
        width = block_tables.shape[1]
        self.block_tables[:n, :width].copy_(block_tables)
        if bs > n:  # padding rows: no KV write, no keys
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
