"""Greedy tokens and logprobs equal HF transformers' on the same weights (float32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.testing.tiny_models import ARCHITECTURES, build_tiny_model

from conftest import PROMPTS

NUM_TOKENS = 32


def hf_greedy(model_dir, prompt_ids: list[int], num_tokens: int):
    """Reference: full forward over the whole sequence at every step (no KV cache at all)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, logprobs = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt_ids):], logprobs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(arch, tiny_model_dirs):
    model_dir = tiny_model_dirs[arch]
    # A small token budget forces chunked prefill of the longer prompts alongside decodes.
    llm = LLM(str(model_dir), num_kv_blocks=128, max_num_batched_tokens=24, seed=0)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    outputs = llm.generate(PROMPTS, params)
    for out in outputs:
        ref_ids, ref_logprobs = hf_greedy(model_dir, out.prompt_token_ids, NUM_TOKENS)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"{arch}: prompt {out.prompt!r}"
        got_logprobs = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
        assert max(abs(a - b) for a, b in zip(got_logprobs, ref_logprobs)) < 1e-4
        assert got.cumulative_logprob == pytest.approx(sum(ref_logprobs), abs=1e-3)
        assert got.finish_reason == "length"


def test_sharded_untied_and_tied_checkpoints(tmp_path):
    """Sharded safetensors with an index, and a tied-embedding Llama, load and match HF."""
    sharded = build_tiny_model(tmp_path / "sharded", "llama", seed=3, num_shards=3)
    tied = build_tiny_model(tmp_path / "tied", "llama", seed=4, tie_word_embeddings=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for model_dir in (sharded, tied):
        llm = LLM(str(model_dir), num_kv_blocks=64)
        out = llm.generate("Hello world", params)[0]
        assert out.outputs[0].token_ids == hf_greedy(model_dir, out.prompt_token_ids, 8)[0]


def test_llama3_rope_scaling_changes_frequencies():
    """The llama3 rule slows long wavelengths by `factor` and keeps short ones, as HF computes."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers import LlamaConfig

    from tokenmill.layers.rotary import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling,
                         max_position_embeddings=1024)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(64, 500000.0, scaling)
    torch.testing.assert_close(ours, ref.float())
    base = rope_inv_freq(64, 500000.0, None)
    assert torch.equal(ours[0], base[0]) and torch.allclose(ours[-1], base[-1] / 8)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3"])
def test_triton_kernels_match_torch_path(arch, tiny_model_dirs):
    """The whole model on Triton kernels (interpreted on a CPU) gives the torch path's tokens."""
    from tokenmill.kernels import HAS_TRITON, kernels_interpreted

    if not HAS_TRITON or not (kernels_interpreted() or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 before triton is imported")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompts = PROMPTS[:3]
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_model_dirs[arch]), num_kv_blocks=64, max_num_batched_tokens=16, device=device,
                  kernel_backend=backend)
        outs[backend] = llm.generate(prompts, params)
    for ref, got in zip(outs["torch"], outs["triton"]):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b in zip(ref.outputs[0].logprobs, got.outputs[0].logprobs):
            (ta, la), = a.items()
            assert la.logprob == pytest.approx(b[ta].logprob, abs=1e-4)


@pytest.mark.parametrize("dtype,tol", [("float16", 0.02), ("bfloat16", 0.1)])
def test_half_precision_tracks_float32_transformers(dtype, tol, llama_dir):
    """16-bit weights and activations: every greedy token is float32 HF's argmax or within `tol` nats of it
    (a near-tie broken the other way by rounding), and its logprob is within `tol` of HF's (teacher-forced)."""
    from transformers import AutoModelForCausalLM

    llm = LLM(str(llama_dir), dtype=dtype, num_kv_blocks=64, max_num_batched_tokens=24)
    assert next(llm.llm_engine.core.runner.model.parameters()).dtype == getattr(torch, dtype)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    for out in llm.generate(PROMPTS, params):
        got = out.outputs[0]
        ids = out.prompt_token_ids + got.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        for i, token in enumerate(got.token_ids):
            row = ref[len(out.prompt_token_ids) - 1 + i]
            assert row.max() - row[token] <= tol, (dtype, out.prompt, i)
            assert abs(got.logprobs[i][token].logprob - row[token].item()) <= tol, (dtype, out.prompt, i)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3"])
def test_fused_gemv_path_matches_transformers(arch, tmp_path, monkeypatch):
    """fused_gemv gives HF's greedy tokens and logprobs (interpreted on a CPU), on both kernel paths:
    with ENGINE_FUSED_ROWS raised to 16 a batch of three takes the tl.dot kernels at every step
    (chunks of 8, then 3 decodes); a prompt alone, at the default limit (1), decodes through
    the one-row kernels. qwen2 covers the qkv bias in the RoPE epilogue, qwen3 the q/k-norm variant."""
    from tokenmill.kernels import HAS_TRITON, kernels_interpreted
    from tokenmill.models import llama

    if not HAS_TRITON or not (kernels_interpreted() or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 before triton is imported")
    rows_seen: list[int] = []
    real = llama.gemv.gemv_norm_silu

    def counting(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(llama.gemv, "gemv_norm_silu", counting)
    # head_dim 32: the multi-row RoPE epilogue takes row sets of 16 (the default tiny head_dim is 16).
    model_dir = build_tiny_model(tmp_path / arch, arch, seed=7, head_dim=32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(str(model_dir), num_kv_blocks=64, max_num_batched_tokens=8, device=device, kernel_backend="triton",
              fused_gemv=True, enforce_eager=True)
    model = llm.llm_engine.core.runner.model.model
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)
    ids = lambda n: torch.zeros(n, dtype=torch.long, device=device)  # noqa: E731

    assert model.takes_fused_path(ids(1)) and not model.takes_fused_path(ids(2))  # the default limit
    alone = [llm.generate([PROMPTS[0]], params)[0]]
    assert rows_seen and set(rows_seen) == {1}, rows_seen  # the decode steps, one row each
    rows_seen.clear()
    monkeypatch.setattr(llama.gemv, "ENGINE_FUSED_ROWS", 16)
    batched = llm.generate(PROMPTS[:3], params)
    assert len(rows_seen) >= len(model.layers) * 5 and max(rows_seen) > 1, rows_seen  # every step fused
    assert model.takes_fused_path(ids(16)) and not model.takes_fused_path(ids(17)) and not model.takes_fused_path(ids(0))
    for out in alone + batched:
        ref_ids, ref_logprobs = hf_greedy(model_dir, out.prompt_token_ids, 5)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"{arch}: prompt {out.prompt!r}"
        got_logprobs = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
        assert max(abs(a - b) for a, b in zip(got_logprobs, ref_logprobs)) < 1e-4


def test_fused_gemv_without_triton_backend_warns(llama_dir):
    """fused_gemv with the torch kernels cannot apply: said once at start-up, and outputs unchanged."""
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    runner_log = logging.getLogger("tokenmill.worker.model_runner")  # tokenmill's loggers do not propagate
    runner_log.addHandler(handler)
    try:
        llm = LLM(str(llama_dir), num_kv_blocks=64, kernel_backend="torch", fused_gemv=True)
    finally:
        runner_log.removeHandler(handler)
    import re

    assert len(records) == 1 and re.fullmatch(
        r"fused_gemv needs the Triton kernels, which kernel_backend='torch' does not use on (cpu|cuda(:\d+)?): "
        r"every step takes the general path", records[0].getMessage()), [r.getMessage() for r in records]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    plain = LLM(str(llama_dir), num_kv_blocks=64, kernel_backend="torch")
    assert llm.generate("Hello", params)[0].outputs[0].token_ids == plain.generate("Hello", params)[0].outputs[0].token_ids
