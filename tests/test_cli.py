"""The command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

from tokenmill import SamplingParams


def run(*args):
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "generate" in result.stdout and "build-tiny-model" in result.stdout


def test_generate_prints_the_greedy_completion(llama_dir, llama_llm):
    result = run("generate", "--model", str(llama_dir), "--prompt", "Hello there", "--max-tokens", "12",
                 "--num-kv-blocks", "64")
    assert result.returncode == 0, result.stderr
    expected = llama_llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert result.stdout == expected + "\n"
    assert "KV cache: 64 blocks x 16 tokens = 1024 tokens" in result.stderr  # capacity reported at start-up


def test_generate_seeded_sampling_is_reproducible(llama_dir):
    args = ["generate", "--model", str(llama_dir), "--prompt", "Hi", "--max-tokens", "12", "--temperature", "1",
            "--num-kv-blocks", "64"]
    first, second = run(*args, "--seed", "3"), run(*args, "--seed", "3")
    assert first.returncode == 0 and first.stdout == second.stdout


def test_generate_reports_bad_input(llama_dir, tmp_path):
    result = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert result.returncode == 2 and "model directory not found" in result.stderr
    result = run("generate", "--model", str(llama_dir), "--prompt", "x", "--top-p", "0", "--num-kv-blocks", "64")
    assert result.returncode == 2 and "top_p must be in (0, 1]" in result.stderr


def test_build_tiny_model(tmp_path):
    result = run("build-tiny-model", str(tmp_path / "m"), "--arch", "qwen3")
    assert result.returncode == 0 and (tmp_path / "m" / "config.json").exists()
