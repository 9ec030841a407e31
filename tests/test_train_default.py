"""The default-model pipeline end to end at toy scale: corpus, tokenizer, two models, model cards."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.entrypoints.cli import main as cli_main
from tokenmill.train.corpus import build_corpus, default_roots, is_heldout
from tokenmill.train.default_model import DRAFT_NAME, MAIN_NAME


def test_corpus_is_deterministic_and_holds_out_whole_modules():
    a = build_corpus(default_roots(), heldout_fraction=0.1, max_total_bytes=2_000_000)
    b = build_corpus(default_roots(), heldout_fraction=0.1, max_total_bytes=2_000_000)
    assert a.manifest == b.manifest and a.train == b.train
    assert a.manifest["files_heldout"] > 0 and not set(a.heldout) & set(a.train)
    assert is_heldout("stdlib/x.py", 1.0) and not is_heldout("stdlib/x.py", 0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("default-models")
    rc = cli_main(["train-default", "--out", str(out), "--device", "cpu", "--max-bytes", "600000",
                   "--vocab-size", "600", "--seq-len", "64", "--batch-size", "4", "--max-steps", "3",
                   "--eval-every", "3", "--heldout-fraction", "0.1"])
    assert rc == 0
    return out


def test_models_load_in_tokenmill_and_match_transformers(trained):
    for name in (MAIN_NAME, DRAFT_NAME):
        model_dir = trained / name
        card = (model_dir / "README.md").read_text()
        assert "held-out loss" in card and "unigram baseline" in card and "def fibonacci(n):" in card
        curve = json.loads((model_dir / "training.json").read_text())["curve"]
        assert curve and curve[-1]["step"] == 3
        llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=128)
        prompt = "def fibonacci(n):"
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ids = list(out.prompt_token_ids)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.outputs[0].token_ids == ids[len(out.prompt_token_ids):]


def test_chat_template_renders_requests_as_comments(trained):
    llm = LLM(str(trained / MAIN_NAME), dtype="float32", num_kv_blocks=128)
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sum a list\nquickly"}])
    assert text == "# You write Python.\n# sum a list\n# quickly\n"
