"""The model used when none is named: tokenmill-code, trained by the project (`tokenmill
train-default`) and shipped in the package, with its draft model for speculative decoding."""

from __future__ import annotations

from pathlib import Path

from tokenmill.errors import ModelLoadError

DEFAULT_MODELS = Path(__file__).resolve().parents[1] / "default_models"
DEFAULT_MODEL = DEFAULT_MODELS / "tokenmill-code"
DEFAULT_DRAFT_MODEL = DEFAULT_MODELS / "tokenmill-code-draft"


def default_model_dir() -> str:
    if not (DEFAULT_MODEL / "config.json").exists():
        raise ModelLoadError(f"the default model is missing from {DEFAULT_MODEL}; pass --model PATH")
    return str(DEFAULT_MODEL)
