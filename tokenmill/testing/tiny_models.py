"""Tiny Hugging Face-format model directories built locally: random weights and a small trained tokenizer.

Used by the test suite and by anyone who wants to run tokenmill without downloading real weights. Everything is
deterministic: the same arguments always produce byte-identical files.
"""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ARCHITECTURES = ("llama", "llama3", "mistral", "qwen2", "qwen3")
TOKENIZER_KINDS = ("byte_level", "byte_fallback")

BOS, EOS, PAD, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]  # ids 0..4, in this order

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's split regex. transformers 5.x ignores tokenizer_class for model_type "qwen2" and rebuilds a Qwen2Tokenizer
# from tokenizer.json's vocab/merges with this regex + NFC, so qwen dirs must use exactly that pipeline to agree.
QWEN_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Weight scales, chosen by measuring greedy decoding of the default 64-wide models. Linear std 0.15 keeps logits
# well away from uniform and makes the output depend on attention (earlier tokens), not just the current token.
# Embedding std is 0.1 rather than ~1: with tied embeddings (qwen defaults) a large embedding makes the current
# token's own logit (~|e|^2) dominate, so greedy decoding just repeats the last token and hides attention bugs.
# Norm weights sit away from 1 so a loader that drops them produces different outputs.
EMBED_STD = 0.1
LINEAR_STD = 0.15
NORM_STD = 0.1
BIAS_STD = 0.1

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small language model does not need to be clever to be useful:
it only needs to be predictable, so that two implementations of the same computation can be compared token by
token. This paragraph exists so that the tokenizer learns common English words such as the, and, of, to, in,
is, that, for, it, with, as, was, on, be, at, by, this, have, from, or, one, had, not, but, what, all, were.

Once upon a time there was a little engine that served tokens. Every morning it woke up, read its queue of
requests, and scheduled as many of them as would fit into memory. Some requests were short questions; others
were long documents that needed to be summarized. The engine kept a cache of keys and values for every
sequence, split into fixed-size blocks, and it freed those blocks as soon as a sequence had finished.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 16):
        self.free = list(range(num_blocks))
        self.block_size = block_size

    def allocate(self, num_tokens: int) -> list[int]:
        needed = (num_tokens + self.block_size - 1) // self.block_size
        if needed > len(self.free):
            raise RuntimeError(f"out of blocks: need {needed}, have {len(self.free)}")
        return [self.free.pop() for _ in range(needed)]

for i in range(10):
    print(i, i * i, fibonacci(i))

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 65536 3.14159 2.71828 -1 1e-5 0x7f 1,000,000.
Dates and times: 2024-01-15, 12:30:45, 1999/12/31. Prices: $19.99, €5.00, £12.50, ¥300.

Le café est très bon à Paris. Die Straße ist schön, und die Bäume blühen. El niño comió una manzana en la
mañana. São Paulo é uma cidade grande. Crème brûlée, façade, naïve, résumé, jalapeño, smörgåsbord, Ångström.

Ἐν ἀρχῇ ἦν ὁ λόγος. Η γλώσσα είναι ένα εργαλείο. Αλφα, βήτα, γάμμα, δέλτα, ε, ζ, η, θ, λ, μ, π, σ, ω.

我们今天学习语言模型。你好，世界！机器学习很有趣。日本語のテキストも少しあります。東京は大きい都市です。

Emoji appear in modern text too: 🙂 🚀 👍 ✨. Mathematical symbols: ∑ ∫ √ ≤ ≥ ≠ ∞ → ∀ ∃.

Q: What is the capital of France?
A: The capital of France is Paris.
Q: How many legs does a spider have?
A: A spider has eight legs.
Q: Write a haiku about the sea.
A: Grey waves fold and break / salt wind carries gulls away / the tide keeps its time.

The scheduler admits new requests only when the cache has room for their prompts. When memory runs low it
preempts the most recently admitted sequence, frees its blocks, and puts it back at the front of the waiting
queue. Greedy decoding always picks the token with the highest logit; sampling draws from the softmax of the
logits divided by the temperature, optionally restricted to the top k tokens or to the smallest set whose
probability mass exceeds top p. A stop sequence ends generation as soon as it appears in the decoded text.
"""


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _byte_tokens() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _byte_fallback_alphabet(pre_tokenizer) -> list[str]:
    counts: dict[str, int] = {}
    for piece, _ in pre_tokenizer.pre_tokenize_str(CORPUS):
        for ch in piece:
            counts[ch] = counts.get(ch, 0) + 1
    ascii_chars = {chr(c) for c in range(0x21, 0x7F)} | {"\n", "\t", "▁"}
    return sorted(ascii_chars | {ch for ch, n in counts.items() if n >= 2})


def _build_tokenizer(vocab_size: int, kind: str, qwen_style: bool = False) -> Tokenizer:
    _check_choice("tokenizer kind", kind, TOKENIZER_KINDS)
    if kind == "byte_level":
        minimum = len(SPECIAL_TOKENS) + 256
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} too small for byte_level: minimum is {minimum} "
                             f"({len(SPECIAL_TOKENS)} specials + 256 byte symbols)")
        tok = Tokenizer(models.BPE())
        if qwen_style:
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([CORPUS], trainer=trainer)
    else:
        # The 256 byte tokens sit right after the specials; train on what is left, then shift the learned ids.
        # The alphabet is pinned (ASCII + non-ASCII characters seen at least twice) so that characters seen only
        # once, e.g. most of the CJK and the emoji, still go through byte fallback; pinning it also avoids the
        # trainer's own tie-breaking when it trims the alphabet.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        alphabet = _byte_fallback_alphabet(tok.pre_tokenizer)
        minimum = len(SPECIAL_TOKENS) + 256 + len(alphabet)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} too small for byte_fallback: minimum is {minimum} "
                             f"({len(SPECIAL_TOKENS)} specials + 256 byte tokens + {len(alphabet)} characters)")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=alphabet, limit_alphabet=len(alphabet))
        tok.train_from_iterator([CORPUS], trainer=trainer)
        spec = json.loads(tok.to_str())
        learned = spec["model"]["vocab"]
        vocab = {t: i for t, i in learned.items() if i < len(SPECIAL_TOKENS)}
        vocab.update({t: len(SPECIAL_TOKENS) + b for b, t in enumerate(_byte_tokens())})
        vocab.update({t: i + 256 for t, i in learned.items() if i >= len(SPECIAL_TOKENS)})
        spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
        tok = Tokenizer.from_str(json.dumps(spec))
        # Same decoder chain as Llama-2's tokenizer.json.
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])

    if tok.get_vocab_size() < vocab_size:
        raise ValueError(f"vocab_size={vocab_size} too large for kind={kind!r}: the built-in corpus supports at most "
                         f"{tok.get_vocab_size()}")
    bos_id = tok.token_to_id(BOS)
    # Llama-3 style: bos on every encode, so raw `tokenizers` and transformers agree.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return tok


def _write_tokenizer(out_dir: pathlib.Path, vocab_size: int, kind: str, model_max_length: int,
                     qwen_style: bool = False) -> Tokenizer:
    tok = _build_tokenizer(vocab_size, kind, qwen_style)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        # Explicit null: Qwen2Tokenizer would otherwise add its default "<|endoftext|>" unk as a new token.
        "unk_token": None,
        "model_max_length": model_max_length,
        # Otherwise transformers may collapse " ." etc. on decode, breaking round-trips.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json",
                {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]})
    return tok


def train_tokenizer(out_dir, *, vocab_size: int = 512, kind: str = "byte_level") -> None:
    """Train a BPE tokenizer on the built-in corpus and write tokenizer.json, tokenizer_config.json and
    special_tokens_map.json into out_dir.

    kind="byte_level" gives a GPT-2/Llama-3 style byte-level BPE; kind="byte_fallback" gives a Llama-2/SentencePiece
    style BPE ("▁" word marker, <0x00>..<0xFF> byte tokens for unseen characters). vocab_size is the total size
    including the 5 special tokens (and the 256 byte tokens for byte_fallback). Raises ValueError for an unknown
    kind, or for a vocab_size below the minimum for that kind (261 byte_level, 378 byte_fallback) or above what the
    built-in corpus can reach (about 1280 byte_level, 1451 byte_fallback; the message names the exact limit).
    """
    _write_tokenizer(pathlib.Path(out_dir), vocab_size, kind, model_max_length=1024)


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _config(arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
            intermediate_size: int, head_dim: int | None, tie: bool, dtype: str, max_position_embeddings: int,
            bos_id: int, eos_id: int) -> dict:
    qwen = arch in ("qwen2", "qwen3")
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "llama3": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": "llama" if arch == "llama3" else arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6 if qwen else 1e-5,
        "rope_theta": {"llama": 10000.0, "mistral": 10000.0, "llama3": 500000.0}.get(arch, 1000000.0),
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tie,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    if arch in ("llama", "llama3"):
        config.update(attention_bias=False, mlp_bias=False)
    if arch == "llama3":
        # Small original length so the llama3 frequency rescaling actually touches a tiny model's frequencies.
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    if arch == "mistral" or qwen:
        config["sliding_window"] = None
    if qwen:
        config.update(use_sliding_window=False, max_window_layers=num_layers)
    if arch == "qwen3":
        config["attention_bias"] = False
    return config


def _random_weights(arch: str, *, seed: int, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                    num_kv_heads: int, intermediate_size: int, head_dim: int, tie: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    def norm(size):
        return 1.0 + normal((size,), NORM_STD)

    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    w = {"model.embed_tokens.weight": normal((vocab_size, hidden_size), EMBED_STD)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden_size)
        w[p + "self_attn.q_proj.weight"] = normal((q_dim, hidden_size), LINEAR_STD)
        w[p + "self_attn.k_proj.weight"] = normal((kv_dim, hidden_size), LINEAR_STD)
        w[p + "self_attn.v_proj.weight"] = normal((kv_dim, hidden_size), LINEAR_STD)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal((q_dim,), BIAS_STD)
            w[p + "self_attn.k_proj.bias"] = normal((kv_dim,), BIAS_STD)
            w[p + "self_attn.v_proj.bias"] = normal((kv_dim,), BIAS_STD)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "self_attn.o_proj.weight"] = normal((hidden_size, q_dim), LINEAR_STD)
        w[p + "post_attention_layernorm.weight"] = norm(hidden_size)
        w[p + "mlp.gate_proj.weight"] = normal((intermediate_size, hidden_size), LINEAR_STD)
        w[p + "mlp.up_proj.weight"] = normal((intermediate_size, hidden_size), LINEAR_STD)
        w[p + "mlp.down_proj.weight"] = normal((hidden_size, intermediate_size), LINEAR_STD)
    w["model.norm.weight"] = norm(hidden_size)
    if not tie:
        w["lm_head.weight"] = normal((vocab_size, hidden_size), LINEAR_STD)
    return w


def _save_weights(out_dir: pathlib.Path, weights: dict[str, torch.Tensor], num_layers: int, num_shards: int) -> None:
    # Leftovers from an earlier build with a different num_shards would confuse loaders.
    for old in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    if num_shards == 1:
        save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    # Shard units in file order: embeddings, each layer, then final norm + lm_head; split contiguously and evenly.
    def unit(name: str) -> int:
        if name.startswith("model.embed_tokens."):
            return 0
        if name.startswith("model.layers."):
            return 1 + int(name.split(".")[2])
        return num_layers + 1

    num_units = num_layers + 2
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for name, tensor in weights.items():
        shards[unit(name) * num_shards // num_units][name] = tensor
    weight_map, total_size = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = fname
            total_size += tensor.numel() * tensor.element_size()
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def build_tiny_model(out_dir, arch: str = "llama", *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                     head_dim: int | None = None, tie_word_embeddings: bool | None = None, num_shards: int = 1,
                     dtype: str = "float32", tokenizer_kind: str = "byte_level", vocab_size: int = 512,
                     max_position_embeddings: int = 1024) -> pathlib.Path:
    """Write a complete Hugging Face model dir (config.json, safetensors weights, generation_config.json,
    tokenizer files) with random weights drawn from `seed`, and return its path.

    config.json uses the original on-disk format (rope_theta / rope_scaling, torch_dtype). The config's vocab_size
    is the trained tokenizer's actual size; `vocab_size` is the tokenizer training target. tie_word_embeddings
    defaults to True for qwen2/qwen3 and False otherwise. num_shards > 1 splits the weights by layer into
    model-0000k-of-0000N.safetensors files plus model.safetensors.index.json.
    """
    _check_choice("arch", arch, ARCHITECTURES)
    _check_choice("dtype", dtype, tuple(_DTYPES))
    _check_choice("tokenizer kind", tokenizer_kind, TOKENIZER_KINDS)
    if arch == "qwen2" and tokenizer_kind != "byte_level":
        raise ValueError("qwen2 needs tokenizer_kind='byte_level': transformers 5.x always loads qwen2 dirs with "
                         "Qwen2Tokenizer, which rebuilds a byte-level tokenizer from the vocab")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if not 1 <= num_shards <= num_layers + 2:
        raise ValueError(f"num_shards={num_shards} must be between 1 and num_layers + 2 = {num_layers + 2}")
    if head_dim is None and hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} not divisible by num_heads={num_heads}; pass head_dim")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _write_tokenizer(out, vocab_size, tokenizer_kind, model_max_length=max_position_embeddings,
                           qwen_style=arch in ("qwen2", "qwen3"))
    real_vocab = tok.get_vocab_size(with_added_tokens=True)
    bos_id, eos_id, im_end_id = (tok.token_to_id(t) for t in (BOS, EOS, IM_END))

    tie = arch in ("qwen2", "qwen3") if tie_word_embeddings is None else tie_word_embeddings
    resolved_head_dim = head_dim if head_dim is not None else hidden_size // num_heads
    dims = dict(vocab_size=real_vocab, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
    # Qwen3 checkpoints always carry head_dim (its config default is 128, not hidden_size // heads).
    config = _config(arch, **dims, head_dim=resolved_head_dim if arch == "qwen3" else head_dim, tie=tie, dtype=dtype,
                     max_position_embeddings=max_position_embeddings, bos_id=bos_id, eos_id=eos_id)
    _write_json(out / "config.json", config)
    # Two eos ids so stop-on-any-eos logic gets exercised; nothing here alters greedy decoding.
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": [eos_id, im_end_id]})

    weights = _random_weights(arch, seed=seed, **dims, head_dim=resolved_head_dim, tie=tie)
    weights = {name: t.to(_DTYPES[dtype]).contiguous() for name, t in weights.items()}
    _save_weights(out, weights, num_layers, num_shards)
    return out
