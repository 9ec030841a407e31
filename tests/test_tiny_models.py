import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenmill.testing.tiny_models import ARCHITECTURES, build_tiny_model, train_tokenizer

MULTIBYTE_TEXT = "Héllo wörld! Ελληνικά 你好 🙂🚀 ∑ x² naïve café.\n\tdef f(x):\n        return x  # done"
UNSEEN_CHARS = "𝄞 龘"  # in no training text, so byte_fallback must spell them out as bytes
TOKENIZER_KINDS = ("byte_level", "byte_fallback")


def _all_weights(model_dir):
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def _load_hf(model_dir):
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_loads_every_arch(tmp_path, arch):
    model_dir = build_tiny_model(tmp_path / arch, arch)
    config = json.loads((model_dir / "config.json").read_text())
    model = _load_hf(model_dir)
    weights = load_file(model_dir / "model.safetensors")

    params = dict(model.named_parameters())
    for name in ["model.layers.1.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"]:
        torch.testing.assert_close(params[name], weights[name], rtol=0, atol=0)
    tied = arch in ("qwen2", "qwen3")
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in weights) is not tied
    torch.testing.assert_close(model.lm_head.weight, weights["model.embed_tokens.weight" if tied else "lm_head.weight"],
                               rtol=0, atol=0)
    if arch == "qwen2":
        torch.testing.assert_close(params["model.layers.0.self_attn.k_proj.bias"],
                                   weights["model.layers.0.self_attn.k_proj.bias"], rtol=0, atol=0)
        assert "model.layers.0.self_attn.o_proj.bias" not in weights
    if arch == "qwen3":
        assert weights["model.layers.0.self_attn.q_norm.weight"].shape == (config["head_dim"],)
        torch.testing.assert_close(params["model.layers.0.self_attn.k_norm.weight"],
                                   weights["model.layers.0.self_attn.k_norm.weight"], rtol=0, atol=0)
    if arch == "llama3":
        assert model.config.rope_parameters["rope_type"] == "llama3"

    # Every HF parameter comes from the file (tied lm_head aside), and nothing extra is in the file.
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert set(weights) == expected

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert config["vocab_size"] == len(tok) == model.config.vocab_size
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2).values
    assert top2[0] - top2[1] > 1e-4  # output is not near-uniform / tied


def test_config_and_generation_config_on_disk(tmp_path):
    cfg = json.loads((build_tiny_model(tmp_path / "l3", "llama3") / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["torch_dtype"] == "float32" and "head_dim" not in cfg

    q3 = build_tiny_model(tmp_path / "q3", "qwen3", dtype="bfloat16", tie_word_embeddings=False)
    cfg = json.loads((q3 / "config.json").read_text())
    assert cfg["head_dim"] == 16 and cfg["rms_norm_eps"] == 1e-6 and cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(q3 / "model.safetensors").values()} == {torch.bfloat16}

    gen = json.loads((q3 / "generation_config.json").read_text())
    tok = Tokenizer.from_file(str(q3 / "tokenizer.json"))
    assert gen["eos_token_id"] == [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|im_end|>")]
    assert gen["bos_token_id"] == cfg["bos_token_id"] == tok.token_to_id("<|begin_of_text|>")


def test_head_dim_override(tmp_path):
    model_dir = build_tiny_model(tmp_path, "mistral", head_dim=32)
    assert json.loads((model_dir / "config.json").read_text())["head_dim"] == 32
    weights = load_file(model_dir / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 32)
    _load_hf(model_dir)


def test_sharded_build_loads(tmp_path):
    model_dir = build_tiny_model(tmp_path / "sharded", "llama", num_shards=3)
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    weights = _all_weights(model_dir)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    for name in files:
        with safe_open(model_dir / name, "pt") as f:
            keys = set(f.keys())
        assert keys and all(index["weight_map"][k] == name for k in keys)

    # Same seed, same tensors as the unsharded build.
    single = load_file(build_tiny_model(tmp_path / "single", "llama") / "model.safetensors")
    assert single.keys() == weights.keys()
    assert all(torch.equal(single[k], weights[k]) for k in single)

    params = dict(_load_hf(model_dir).named_parameters())
    for name in ["model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.down_proj.weight",
                 "lm_head.weight"]:
        torch.testing.assert_close(params[name], weights[name], rtol=0, atol=0)


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = build_tiny_model(tmp_path / "a", "qwen2", seed=7, num_shards=2)
    b = build_tiny_model(tmp_path / "b", "qwen2", seed=7, num_shards=2)
    c = build_tiny_model(tmp_path / "c", "qwen2", seed=8, num_shards=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in names:
        same = (a / name).read_bytes() == (c / name).read_bytes()
        assert same != name.endswith(".safetensors"), name  # only the weights depend on the seed


def _check_hf_and_raw_tokenizers_agree(model_dir):
    hf = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert len(hf) == raw.get_vocab_size() == 512
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    for text in [MULTIBYTE_TEXT, UNSEEN_CHARS, "Hello world", ""]:
        ids = hf.encode(text)
        assert ids == raw.encode(text).ids
        assert ids[0] == hf.bos_token_id == raw.token_to_id("<|begin_of_text|>")
        assert hf.decode(ids, skip_special_tokens=True) == text
        assert raw.decode(ids) == text
    assert hf.unk_token_id is None
    chat = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n"
    assert hf.encode(chat, add_special_tokens=False) == raw.encode(chat, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizer_hf_and_raw_agree_and_round_trip(tmp_path, kind):
    train_tokenizer(tmp_path, kind=kind)
    _check_hf_and_raw_tokenizers_agree(tmp_path)


# transformers picks the tokenizer class by model_type (qwen2 dirs always get Qwen2Tokenizer), so check model dirs too.
@pytest.mark.parametrize("arch,kind", [(a, k) for a in ARCHITECTURES for k in TOKENIZER_KINDS
                                       if (a, k) != ("qwen2", "byte_fallback")])
def test_model_dir_tokenizer_agrees_with_hf(tmp_path, arch, kind):
    _check_hf_and_raw_tokenizers_agree(build_tiny_model(tmp_path, arch, tokenizer_kind=kind, num_layers=1))


def test_byte_fallback_spells_unseen_characters_as_bytes(tmp_path):
    train_tokenizer(tmp_path, kind="byte_fallback")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    tokens = tok.encode("𝄞").tokens
    assert tokens[-4:] == ["<0xF0>", "<0x9D>", "<0x84>", "<0x9E>"]
    assert tok.decode(tok.encode("a𝄞b 龘").ids) == "a𝄞b 龘"


def test_chat_template_renders(tmp_path):
    train_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("assistant\n")
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizer_training_is_deterministic(tmp_path, kind):
    train_tokenizer(tmp_path / "a", kind=kind, vocab_size=700)
    train_tokenizer(tmp_path / "b", kind=kind, vocab_size=700)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json")).get_vocab_size() == 700


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="qwen3"):
        build_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="byte_fallback"):
        train_tokenizer(tmp_path, kind="wordpiece")
    with pytest.raises(ValueError, match="byte_level"):
        build_tiny_model(tmp_path, "qwen2", tokenizer_kind="byte_fallback")
    with pytest.raises(ValueError, match="minimum is 261"):
        train_tokenizer(tmp_path, kind="byte_level", vocab_size=200)
    with pytest.raises(ValueError, match="minimum is"):
        train_tokenizer(tmp_path, kind="byte_fallback", vocab_size=300)
    with pytest.raises(ValueError, match="at most"):
        train_tokenizer(tmp_path, vocab_size=100_000)
