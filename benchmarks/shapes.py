"""Model shapes for benchmarks: configs of real models, built with random weights (no download)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.testing.tiny_models import train_tokenizer

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                hidden_act="silu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                torch_dtype="bfloat16")

QWEN3_0_6B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  hidden_act="silu", tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                  torch_dtype="bfloat16")

# For smoke-testing the benchmark scripts on a CPU.
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, torch_dtype="float32")

SHAPES = {"llama-8b": LLAMA_8B, "qwen3-0.6b": QWEN3_0_6B, "tiny": TINY}


def write_dummy_model_dir(path: Path, config: dict) -> Path:
    """A model directory with config.json and a small tokenizer, to load with load_format="dummy".
    Prompts are token ids; generated ids beyond the tokenizer's vocabulary decode to nothing."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    train_tokenizer(path)
    return path
