"""Shared fixtures: tiny models of every architecture, built once per test session."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, which must be chosen before
# triton is first imported (it decides when kernels are defined). Set it for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tokenmill.testing.tiny_models import ARCHITECTURES, build_tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))

PROMPTS = [
    "Hello world",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ünïcödé — καλημέρα 你好 🎉",
]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """arch -> path of a tiny float32 model of that architecture."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch, seed=1) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def llama_llm(llama_dir):
    """One shared engine for tests that only read outputs (each test submits its own requests)."""
    from tokenmill import LLM

    return LLM(str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=64, seed=0)
