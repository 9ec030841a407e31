"""Bad models and bad requests give errors that name the problem and the limit."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError, ModelLoadError


@pytest.fixture()
def model_copy(llama_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(llama_dir, target)
    return target


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_architecture(model_copy):
    edit_config(model_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*LlamaForCausalLM"):
        LLM(str(model_copy))


def test_unsupported_rope_type(model_copy):
    edit_config(model_copy, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="rope_type 'yarn' is not supported; supported: default, linear, llama3"):
        LLM(str(model_copy))


def test_missing_files(model_copy, tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        LLM(str(tmp_path / "nope"))
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors weight files"):
        LLM(str(model_copy))
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        LLM(str(model_copy))


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer files missing.*tokenizer.json"):
        LLM(str(model_copy))


def test_corrupt_files(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json .* is not valid JSON"):
        LLM(str(model_copy))


def test_corrupt_weights(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="weight file .*model.safetensors is corrupt"):
        LLM(str(model_copy))


def test_missing_and_misshapen_tensors(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match="checkpoint lacks 1 tensors.*layers.1.mlp.gate_up_proj"):
        LLM(str(model_copy))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].clone()
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match=r"up_proj.weight' has shape \(64, 128\), the config implies \(128, 64\)"):
        LLM(str(model_copy))


def test_sharded_index_naming_missing_file(tmp_path):
    from tokenmill.testing.tiny_models import build_tiny_model

    path = build_tiny_model(tmp_path / "sharded", "llama", num_shards=2)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="names weight files that are missing"):
        LLM(str(path))


def test_max_model_len_beyond_model_limit(llama_dir):
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) is larger than the model's limit \(1024\)"):
        LLM(str(llama_dir), max_model_len=4096)


def test_kv_cache_smaller_than_context(llama_dir):
    with pytest.raises(ValueError, match=r"KV cache holds 64 tokens .* fewer than max_model_len \(1024\)"):
        LLM(str(llama_dir), num_kv_blocks=4)


def test_unknown_engine_argument(llama_dir):
    with pytest.raises(TypeError, match="unknown engine arguments \\['tensor_parallel'\\]"):
        LLM(str(llama_dir), tensor_parallel=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(max_tokens=-1), "max_tokens must be an integer >= 1, got -1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_k=-3), "top_k must be -1 .* got -3"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\], got 2.0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
    (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\], got 3.0"),
    (dict(frequency_penalty=-2.5), r"frequency_penalty must be in \[-2, 2\], got -2.5"),
    (dict(min_tokens=5, max_tokens=3), r"min_tokens \(5\) must be <= max_tokens \(3\)"),
    (dict(logprobs=50), r"logprobs must be an integer in \[0, 20\], got 50"),
    (dict(n=0), "n must be an integer >= 1, got 0"),
    (dict(stop=[""]), "stop must be non-empty strings"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        SamplingParams(**kwargs)
    assert info.value.param == next(iter(kwargs)) or "min_tokens" in kwargs


def test_prompt_too_long_names_both_lengths(llama_llm):
    with pytest.raises(InvalidRequestError, match=r"prompt 1: This model's maximum context length is 1024 tokens .*the prompt has 1100 tokens"):
        llama_llm.generate(["ok", [7] * 1100], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llama_llm.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match=r"token id 99999 is out of range for the vocabulary \[0, 5"):
        llama_llm.generate([[5, 99999]], SamplingParams(max_tokens=2))


def test_bad_request_does_not_disturb_running_ones(llama_llm):
    engine = llama_llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llama_llm.generate(["alpha beta", "gamma delta"], params)]
    engine.add_request("good-0", "alpha beta", params)
    engine.add_request("good-1", "gamma delta", params)
    engine.step()
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", [3] * 5000, params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good-0", "again", params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert [finished["good-0"], finished["good-1"]] == expected


def test_abort_frees_blocks(llama_llm):
    engine = llama_llm.llm_engine
    engine.add_request("to-abort", "some prompt", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    kv = engine.core.scheduler.kv
    assert kv.allocator.num_free < kv.num_blocks
    out = engine.abort_request("to-abort")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert kv.allocator.num_free == kv.num_blocks and not engine.has_unfinished_requests()
