"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over the paged KV cache.

One class serves all four: they differ only in flags of `ModelConfig` (qkv bias, q/k norm, tied
embeddings, RoPE scaling). q/k/v and gate/up are fused into single matmuls; `load_weights` maps
the checkpoint's separate HF tensors into the fused ones.

Two forward paths over the same weights. The general one (any batch): norm, linear (cuBLAS),
RoPE, KV write, attention, ... as separate kernels. With `fused_gemv`, batches of at most
`gemv.ENGINE_FUSED_ROWS` tokens on the Triton backend take the fused path instead: the residual
stream is carried already summed, and each layer is gemv_norm_rope_kv -> attention ->
gemv_linear(+residual) -> gemv_norm_silu -> gemv_linear(+residual) (tokenmill/kernels/gemv.py),
5 launches where the general path makes ~13 (one-token steps by default: 92% of the bandwidth
roofline at batch 1 on an H200, docs/performance.md). Both round where torch does after each
projection. Before it, the one-row kernels skip the norm's two roundings to the activation dtype
and apply 1/rms after the dot product, so on CUDA a request decoding alone and one in a batch
take numerically different paths by default: the same tokens up to bf16 near-ties (and the
projections' summation order).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill import kernels
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding

try:
    from tokenmill.kernels import gemv
except ImportError:  # no triton: only the general path exists
    gemv = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: str):
        super().__init__()
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, backend) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, backend) if cfg.qk_norm else None
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q = self._norm_rotate_store(positions, q, k, v, kv_cache, meta)
        out = kernels.paged_attention(q, kv_cache, meta, self.scale, backend=self.backend)
        return self.o_proj(out.reshape(num_tokens, self.q_size))

    def _norm_rotate_store(self, positions, q, k, v, kv_cache, meta) -> torch.Tensor:
        """q/k norms (when the model has them), RoPE on q and k, k and v into the cache; returns the
        rotated q. One kernel on Triton."""
        if kernels.use_triton(q, self.backend):
            norms = {} if self.q_norm is None else dict(q_norm_weight=self.q_norm.weight,
                                                        k_norm_weight=self.k_norm.weight, eps=self.q_norm.eps)
            return kernels.rotary_write_kv_triton(positions, q, k, v, self.rotary.cos_cached, self.rotary.sin_cached,
                                                  kv_cache, meta.slot_mapping, **norms)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        kernels.write_kv(kv_cache, k, v, meta.slot_mapping, backend=self.backend)
        return q

    def forward_fused(self, positions: torch.Tensor, stream: torch.Tensor, norm: RMSNorm, kv_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        """The fused path: `stream` is the summed residual stream; returns stream + attention output."""
        num_tokens = stream.shape[0]
        if self.q_norm is None:
            q = gemv.gemv_norm_rope_kv(stream, norm.weight, norm.eps, self.qkv_proj.weight, self.qkv_proj.bias,
                                       positions, self.rotary.cos_cached, self.rotary.sin_cached, kv_cache,
                                       meta.slot_mapping, self.num_heads)
        else:  # q/k norms need whole heads: norm + projection, then norms + RoPE + KV write
            qkv = gemv.gemv_linear(stream, self.qkv_proj.weight, self.qkv_proj.bias, norm_weight=norm.weight,
                                   eps=norm.eps)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self._norm_rotate_store(positions, q.view(num_tokens, self.num_heads, self.head_dim),
                                        k.view(num_tokens, self.num_kv_heads, self.head_dim),
                                        v.view(num_tokens, self.num_kv_heads, self.head_dim), kv_cache, meta)
        out = kernels.paged_attention(q, kv_cache, meta, self.scale, backend=self.backend)
        return gemv.gemv_linear(out.reshape(num_tokens, self.q_size), self.o_proj.weight, self.o_proj.bias,
                                residual=stream)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        self.backend = backend
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.backend))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: str):
        super().__init__()
        self.self_attn = Attention(cfg, rotary, backend)
        self.mlp = MLP(cfg, backend)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)

    def forward(self, positions, hidden, residual, kv_cache, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def forward_fused(self, positions, stream, kv_cache, meta):
        """The fused path: takes and returns the summed residual stream."""
        stream = self.self_attn.forward_fused(positions, stream, self.input_layernorm, kv_cache, meta)
        norm, mlp = self.post_attention_layernorm, self.mlp
        act = gemv.gemv_norm_silu(stream, norm.weight, norm.eps, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
        return gemv.gemv_linear(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=stream)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: str, fused_gemv: bool = False):
        super().__init__()
        self.backend = backend
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.fused_gemv = fused_gemv and gemv is not None
        self.head_dim = cfg.head_dim

    def takes_fused_path(self, input_ids: torch.Tensor) -> bool:
        """Whether a batch of these tokens runs the fused layers (static in the batch size: a CUDA
        graph captured for a size replays the path chosen at capture)."""
        n = input_ids.shape[0]
        if not self.fused_gemv or n == 0 or n > gemv.ENGINE_FUSED_ROWS or not kernels.use_triton(input_ids, self.backend):
            return False
        return gemv.supports_rope_layout(n, self.head_dim)

    def forward(self, input_ids, positions, kv_caches, meta):
        if self.takes_fused_path(input_ids):
            stream = self.embed_tokens(input_ids)
            for layer, kv_cache in zip(self.layers, kv_caches):
                stream = layer.forward_fused(positions, stream, kv_cache, meta)
            return self.norm(stream)
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# HF checkpoint name -> (our fused parameter, shard index within it).
_STACKED = (
    ("q_proj", "qkv_proj", 0), ("k_proj", "qkv_proj", 1), ("v_proj", "qkv_proj", 2),
    ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1),
)
# Tensors some checkpoints carry that hold nothing we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class DecoderForCausalLM(nn.Module):
    """The model the runner calls: `forward` gives hidden states, `compute_logits` logits (float32 by default).
    `backend` ("auto", "torch", "triton") picks the kernels, as `tokenmill.kernels.use_triton` resolves it;
    `fused_gemv` lets small batches take the fused path (module docstring)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: str = "auto", fused_gemv: bool = False):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_positions, backend, fused_gemv)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits of `hidden`'s rows; float32 (what the sampler needs) or in the model's dtype (enough
        for an argmax: the cast to float32 is exact, so it changes neither the max nor its index)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = hidden @ weight.t()
        return logits.float() if float32 else logits

    def _shard_slices(self, fused: str) -> list[tuple[int, int]]:
        cfg = self.config
        if fused == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        inter = cfg.intermediate_size
        return [(0, inter), (inter, 2 * inter)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; every parameter must be filled exactly."""
        params = dict(self.named_parameters())
        expected: dict[str, set] = {}
        for name, param in params.items():
            fused = next((f for _, f, _ in _STACKED if f"{f}." in name), None)
            expected[name] = set(range(len(self._shard_slices(fused)))) if fused else {None}
        loaded: dict[str, set] = {name: set() for name in params}
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            name, shard = hf_name, None
            for hf_part, fused, shard_id in _STACKED:
                if f".{hf_part}." in hf_name:
                    name, shard = hf_name.replace(f".{hf_part}.", f".{fused}."), shard_id
                    break
            param = params.get(name)
            if param is None:
                raise ModelLoadError(f"checkpoint tensor {hf_name!r} has no place in {self.config.architecture}")
            target = param.data
            if shard is not None:
                lo, hi = self._shard_slices(name.split(".")[-2])[shard]
                target = target[lo:hi]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelLoadError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {tuple(target.shape)}")
            target.copy_(tensor)
            loaded[name].add(shard)
        missing = sorted(n for n in params if loaded[n] != expected[n])
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights for benchmarks of shapes we have no checkpoint for (vLLM's load_format=dummy)."""
        gen = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for name, param in self.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)
