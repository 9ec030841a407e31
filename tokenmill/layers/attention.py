"""Attention over the paged KV cache: the metadata the runner builds per step and the PyTorch path.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a
request's tokens live in the blocks of its block table, position p at block_table[p // block_size],
offset p % block_size. The runner flattens all scheduled tokens of all requests into one batch
(prefill chunks and decodes together); `AttentionMetadata` says where each request's queries sit.
This module is the reference path (CPU and GPU); kernels added later must match it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each scheduled request's queries and keys are, for one step.

    Requests are ordered decodes first (query_len 1), then prefill chunks, so the decode group is
    one contiguous slice [0, num_decodes) of queries.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot to write each new token's k/v to
    block_tables: torch.Tensor  # [R, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [R] int32: tokens in the cache after this step (context + new)
    query_start_loc: torch.Tensor  # [R + 1] int32: request r's queries are [qsl[r], qsl[r+1])
    # Host copies: the PyTorch path loops over prefills in Python and must not sync on the device.
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    num_decodes: int
    # Bound on decode seq lens for sizing the decode kernel's grid; set (to max_model_len) for CUDA
    # graphs so one captured grid serves every later step. None: this batch's maximum.
    max_decode_seq_len: int | None = None


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's k/v ([T, Hkv, D]) into their slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def _gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int):
    """[R, max_blocks] block tables -> k, v of shape [R, Hkv, max_len, D]."""
    num_reqs = block_tables.shape[0]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_blocks = (max_len + block_size - 1) // block_size
    blocks = block_tables[:, :num_blocks].long()
    k = kv_cache[0][blocks].reshape(num_reqs, num_blocks * block_size, num_kv_heads, head_dim)
    v = kv_cache[1][blocks].reshape(num_reqs, num_blocks * block_size, num_kv_heads, head_dim)
    return k[:, :max_len].transpose(1, 2), v[:, :max_len].transpose(1, 2)


def paged_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over each request's cached context. Returns [T, Hq, D].

    GQA is handled by SDPA's enable_gqa, so K/V are never repeated in memory.
    """
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        max_len = max(meta.seq_lens_cpu[:nd])
        k, v = _gather_kv(kv_cache, meta.block_tables[:nd], max_len)
        positions = torch.arange(max_len, device=q.device)
        mask = (positions[None, :] < meta.seq_lens[:nd, None]).view(nd, 1, 1, max_len)
        dq = q[:nd].unsqueeze(2)  # [nd, Hq, 1, D]
        o = F.scaled_dot_product_attention(dq, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[:nd] = o.squeeze(2)
    start = nd
    for r in range(nd, len(meta.seq_lens_cpu)):
        q_len, seq_len = meta.query_lens_cpu[r], meta.seq_lens_cpu[r]
        k, v = _gather_kv(kv_cache, meta.block_tables[r:r + 1], seq_len)
        # Query i sits at absolute position seq_len - q_len + i and sees keys up to there.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        pq = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        o = F.scaled_dot_product_attention(pq, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + q_len] = o.squeeze(0).transpose(0, 1)
        start += q_len
    return out
