"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over the paged KV cache.

One class serves all four: they differ only in flags of `ModelConfig` (qkv bias, q/k norm, tied
embeddings, RoPE scaling). q/k/v and gate/up are fused into single matmuls; `load_weights` maps
the checkpoint's separate HF tensors into the fused ones.
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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        kernels.write_kv(kv_cache, k, v, meta.slot_mapping, backend=self.backend)
        out = kernels.paged_attention(q, kv_cache, meta, self.scale, backend=self.backend)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


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


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: str):
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)

    def forward(self, input_ids, positions, kv_caches, meta):
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
    """The model the runner calls: `forward` gives hidden states, `compute_logits` float32 logits.
    `backend` ("auto", "torch", "triton") picks the kernels, as `tokenmill.kernels.use_triton` resolves it."""

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: str = "auto"):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_positions, backend)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (hidden @ weight.t()).float()

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
