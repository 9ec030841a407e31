"""Build a model on its device and fill it from the directory's safetensors files."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.models.llama import DecoderForCausalLM

logger = logging.getLogger(__name__)

# Every supported architecture is the same decoder with different flags (see models/llama.py).
MODEL_REGISTRY = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
}

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files: those the index names, else every *.safetensors in the directory."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{index.name} names weight files that are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {found}; tokenmill loads only safetensors)" if found else ""
        raise ModelLoadError(f"no *.safetensors weight files in {model_dir}{hint}")
    return files


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"weight file {path} is corrupt or unreadable: {e}") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_dir: str | Path, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device,
               max_positions: int, load_format: str = "safetensors", seed: int = 0,
               kernel_backend: str = "auto", fused_gemv: bool = False) -> DecoderForCausalLM:
    """Allocate the model directly on `device` in `dtype`, then load (or randomly init) its weights."""
    start = time.perf_counter()
    model_cls = MODEL_REGISTRY[cfg.architecture]
    files = safetensors_files(Path(model_dir)) if load_format == "safetensors" else []
    with _default_dtype(dtype), torch.device(device):
        model = model_cls(cfg, max_positions, kernel_backend, fused_gemv)
    with torch.no_grad():
        if load_format == "dummy":
            model.init_dummy_weights(seed)
        else:
            model.load_weights(iterate_weights(files))
    model.eval()
    logger.info("loaded %s from %s (%s, %s, %s) in %.2f s", cfg.architecture, model_dir, load_format, dtype, device,
                time.perf_counter() - start)
    return model
