"""The shipped default models: they load through the normal HF path, tokenmill equals transformers on
them, and the main model writes valid Python for a prompt from a module it never trained on."""

from __future__ import annotations

import codeop
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.models.default_model import DEFAULT_DRAFT_MODEL, DEFAULT_MODEL
from tokenmill.train.corpus import is_heldout

# A module the training run held out (whole modules, by a hash of "stdlib/<path>"), present in
# every CPython 3.x standard library.
HELDOUT_MODULE = "encodings/cp1257.py"


def heldout_prompt() -> str:
    assert is_heldout(f"stdlib/{HELDOUT_MODULE}", json.loads(
        (DEFAULT_MODEL / "training.json").read_text())["corpus"]["heldout_fraction"])
    lines = (Path(sysconfig.get_paths()["stdlib"]) / HELDOUT_MODULE).read_text().splitlines(keepends=True)
    first_def = next(i for i, line in enumerate(lines) if line.startswith("def "))
    return "".join(lines[:first_def])  # the module up to its first function: imports, classes, tables


def test_losses_recorded_main_below_draft():
    main = json.loads((DEFAULT_MODEL / "training.json").read_text())["curve"][-1]["heldout_loss"]
    draft = json.loads((DEFAULT_DRAFT_MODEL / "training.json").read_text())["curve"][-1]["heldout_loss"]
    assert main < draft - 0.5
    card = (DEFAULT_MODEL / "README.md").read_text()
    card_loss = float(re.search(r"\| held-out loss \| ([\d.]+) nats/token", card).group(1))
    unigram = float(re.search(r"\| unigram baseline \| ([\d.]+) nats/token", card).group(1))
    assert card_loss == pytest.approx(main, abs=5e-4)
    assert main < unigram - 3 and draft < unigram - 2   # far below a unigram model of the same corpus
    assert sum(f.stat().st_size for f in DEFAULT_MODEL.glob("*.safetensors")) <= 40e6


def test_heldout_completion_is_valid_python_and_matches_transformers():
    prompt = heldout_prompt()
    llm = LLM(str(DEFAULT_MODEL), dtype="float32", max_model_len=2048, num_kv_blocks=256)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    ids = list(llm.get_tokenizer().encode(prompt))
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.token_ids == ids[-len(out.token_ids):]
    lines = out.text.split("\n")[:-1]  # complete lines only
    valid = 0
    for k in range(1, len(lines) + 1):
        try:
            codeop.compile_command(prompt + "\n".join(lines[:k]) + "\n", symbol="exec")
        except SyntaxError:
            break
        valid = k
    code = [line for line in lines[:valid] if line.strip() and not line.lstrip().startswith("#")]
    assert valid >= 3 and len(code) >= 3, out.text


def test_draft_model_loads_and_shares_the_tokenizer():
    main = json.loads((DEFAULT_MODEL / "tokenizer.json").read_text())
    draft = json.loads((DEFAULT_DRAFT_MODEL / "tokenizer.json").read_text())
    assert main == draft
    llm = LLM(str(DEFAULT_DRAFT_MODEL), dtype="float32", max_model_len=512, num_kv_blocks=64)
    assert llm.generate("import os\n", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids


def test_generate_without_model_uses_the_default():
    result = subprocess.run([sys.executable, "-m", "tokenmill", "generate", "--prompt", "def fibonacci(n):",
                             "--max-tokens", "24", "--num-kv-blocks", "256", "--max-model-len", "1024"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokenmill-code" in result.stderr  # the default model was loaded
    # plausible: the completion starts with a function body (indented lines up to the first line back at
    # column 0, where the model may go on with other code) of >= 2 lines that compiles with the prompt
    lines = ("def fibonacci(n):" + result.stdout).split("\n")[1:-1]   # the last line may be cut off
    end = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith((" ", "\t"))), len(lines))
    body = [line for line in lines[:end] if line.strip()]
    assert len(body) >= 2, result.stdout
    code = codeop.compile_command("def fibonacci(n):\n" + "\n".join(body) + "\n\n", symbol="exec")
    assert code is not None, result.stdout  # None: incomplete (an unclosed string or bracket); invalid raises
