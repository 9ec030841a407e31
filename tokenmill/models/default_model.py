"""The model used when none is named: until the project ships trained weights, a tiny random-weight
Llama built locally once (its text is gibberish, but every part of the engine and server runs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def default_model_dir() -> str:
    cache = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
    path = cache / "tiny-llama"
    if not (path / "config.json").exists():
        from tokenmill.testing.tiny_models import build_tiny_model

        logger.info("no --model given: building the built-in tiny model in %s", path)
        build_tiny_model(path, "llama", seed=0)
    return str(path)
