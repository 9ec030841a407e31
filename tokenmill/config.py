"""Configuration: the model's shape (read from an HF config.json) and the engine's knobs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Accept torch dtypes and the strings vLLM/HF use ('bfloat16', 'float16', 'float32', ...)."""
    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16, torch.float16):
            return value
        raise ValueError(f"dtype {value} is not supported; use float32, bfloat16 or float16")
    key = str(value).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; use one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[key]


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{what} at {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} at {path} must hold a JSON object")
    return data


@dataclass
class ModelConfig:
    """The transformer's shape and numerics, for every supported decoder-only architecture."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2; Llama's attention_bias also sets it
    o_bias: bool  # Llama's attention_bias only
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None
    checkpoint_dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Read config.json (old or transformers-v5 layout) and generation_config.json (EOS ids)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory not found: {model_dir}")
        cfg = _read_json(model_dir / "config.json", "config.json")
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or cfg.get('model_type')!r} in {model_dir / 'config.json'}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise ModelLoadError(f"hidden_act {act!r} is not supported; only 'silu'")
            rope_theta, rope_scaling = _rope_parameters(cfg)
            attention_bias = bool(cfg.get("attention_bias", False))
            is_qwen2 = arch == "Qwen2ForCausalLM"
            sliding_window = cfg.get("sliding_window")
            if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not cfg.get("use_sliding_window", False):
                sliding_window = None
            dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            model = cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=is_qwen2 or attention_bias,
                o_bias=attention_bias and not is_qwen2,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch == "Qwen3ForCausalLM",
                sliding_window=int(sliding_window) if sliding_window else None,
                checkpoint_dtype=parse_dtype(dtype_name) if dtype_name in _DTYPES else torch.float32,
                bos_token_id=cfg.get("bos_token_id"),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json in {model_dir} lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json in {model_dir} has an invalid value: {e}") from None
        if model.num_heads % model.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({model.num_heads}) must be a multiple of num_key_value_heads "
                f"({model.num_kv_heads})")
        model.eos_token_ids = _eos_token_ids(model_dir, cfg)
        return model


def _rope_parameters(cfg: dict) -> tuple[float, dict | None]:
    # transformers v5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`.
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = params
    theta = float(theta if theta is not None else 10000.0)
    if scaling:
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type == "default":
            return theta, None
        return theta, dict(scaling, rope_type=rope_type)
    return theta, None


def _eos_token_ids(model_dir: Path, cfg: dict) -> list[int]:
    # generation_config.json is authoritative (Llama-3 instruct lists several EOS ids there).
    ids: list[int] = []
    gen_path = model_dir / "generation_config.json"
    sources = [cfg.get("eos_token_id")]
    if gen_path.exists():
        sources.insert(0, _read_json(gen_path, "generation_config.json").get("eos_token_id"))
    for value in sources:
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return ids


@dataclass
class EngineConfig:
    """Everything the engine needs to start. Names follow vLLM's engine arguments."""

    model: str
    dtype: str | torch.dtype = "auto"  # "auto": the checkpoint's dtype, but bfloat16 for fp32 checkpoints on CUDA
    device: str | None = None  # None: CUDA if available, else CPU
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides the memory-based sizing (vLLM: num_gpu_blocks_override)
    cpu_kv_cache_gib: float = 1.0  # KV size on CPU, where free memory is not a useful signal
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True  # reuse the KV of cached prompt prefixes (--no-prefix-caching)
    # Opt-in JSONL log of finished requests (token ids, cache hits, timings) for `tokenmill
    # cache-report`; rotated when it would grow past request_log_max_bytes, keeping
    # request_log_backup_count older files (path.1 newest ... path.N oldest).
    request_log_path: str | None = None
    request_log_max_bytes: int = 256 * 2**20
    request_log_backup_count: int = 5
    load_format: str = "safetensors"  # "dummy": random weights from config.json (benchmarks of big shapes)
    # Kernels for attention, KV writes, norms, RoPE, SiLU: "auto" = Triton on CUDA, PyTorch elsewhere;
    # "torch" = the reference path everywhere; "triton" = Triton (on CPU only under TRITON_INTERPRET=1).
    kernel_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs for decode steps (they need the Triton kernels on CUDA)
    # One-token steps (batch-1 decode) on the Triton backend run each decoder layer as 5 fused
    # kernels (projection + norm / RoPE / KV write / SiLU / residual add; tokenmill/kernels/gemv.py)
    # instead of cuBLAS plus ~9 small kernels: 92% of the bandwidth roofline against 75% on an H200.
    # None = on for CUDA devices; True on a backend without Triton kernels is warned about.
    fused_gemv: bool | None = None
    # Schedule and queue step N+1 before reading step N's tokens back (EngineCore.step). None = on
    # when the device is CUDA (where host and device run in parallel), off on the CPU.
    async_scheduling: bool | None = None
    seed: int = 0
    tokenizer: str | None = None  # defaults to the model directory

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two in [1, 256], got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend must be 'auto', 'torch' or 'triton', got {self.kernel_backend!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.request_log_max_bytes < 1:
            raise ValueError(f"request_log_max_bytes must be >= 1, got {self.request_log_max_bytes}")
        if self.request_log_backup_count < 0:
            raise ValueError(f"request_log_backup_count must be >= 0, got {self.request_log_backup_count}")

    def resolve_fused_gemv(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.fused_gemv is None else bool(self.fused_gemv)

    def resolve_async_scheduling(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.async_scheduling is None else bool(self.async_scheduling)

    def resolve_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolve_dtype(self, model_config: ModelConfig, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        if device.type == "cuda" and model_config.checkpoint_dtype == torch.float32:
            return torch.bfloat16
        return model_config.checkpoint_dtype

    def resolve_max_model_len(self, model_config: ModelConfig) -> int:
        """The context limit: the user's value, bounded by what the model was built for."""
        limit = model_config.max_position_embeddings
        if model_config.sliding_window and model_config.sliding_window < limit:
            # Without sliding-window attention the model is only exact up to its window.
            logger.warning("model uses a sliding window of %d tokens; capping max_model_len to it",
                           model_config.sliding_window)
            limit = model_config.sliding_window
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.max_model_len}) is larger than the model's limit ({limit})")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        return self.max_model_len
