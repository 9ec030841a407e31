"""Incremental detokenization equals decoding the whole sequence, for both tokenizer kinds."""

from __future__ import annotations

import random

import pytest

from tokenmill.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from tokenmill.testing.tiny_models import train_tokenizer
from tokenmill.tokenizer import Tokenizer

TEXTS = ["Hello, world! Ünïcödé — καλημέρα 你好 🎉 ok", "def f(x):\n    return x ** 2  # 平方", "𝄞 𓀀 ⅞ emoji 👩‍💻!"]


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tokenizer(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    train_tokenizer(path, kind=request.param)
    return Tokenizer(path)


def stream(tokenizer, prompt_ids, output_ids):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add_token(t) for t in output_ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_streams_exactly(tokenizer, text):
    prompt = tokenizer.encode("Prompt:")
    output = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, prompt, output)
    # In context: SentencePiece-style "▁Hello" after a prompt reads " Hello"; byte-level adds nothing.
    expected = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)):]
    assert "".join(deltas) == expected and expected.strip() == text.strip()
    assert not any("\ufffd" in d for d in deltas)  # never a half character on the way


def test_byte_fallback_splits_characters_across_tokens(tmp_path):
    train_tokenizer(tmp_path, kind="byte_fallback")
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("𝄞", add_special_tokens=False)
    assert len(ids) >= 4  # one 4-byte character, one <0x..> token per byte
    assert stream(tokenizer, tokenizer.encode("x"), ids)[:-1].count("") >= 3


def test_random_token_streams_equal_full_decode(tokenizer):
    rng = random.Random(0)
    prompt = tokenizer.encode("The prompt ends here.")
    prompt_text = tokenizer.decode(prompt)
    # Byte-fallback <0xNN> tokens in random order form invalid UTF-8 runs, which the decoder turns into
    # U+FFFD per byte of the whole run; valid multi-byte runs are covered above. Use the other tokens.
    first = 261 if tokenizer.hf.convert_ids_to_tokens(5) == "<0x00>" else 5
    for _ in range(50):
        output = [rng.randrange(first, tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
        expected = tokenizer.decode(prompt + output)[len(prompt_text):]
        assert "".join(stream(tokenizer, prompt, output)) == expected


def test_find_stop_string():
    assert find_stop_string("abc STOP def", 12, ["STOP"]) == (4, "STOP")
    assert find_stop_string("abc ST", 2, ["STOP"]) is None
    # only matches that end in the new characters count; the earliest start wins
    assert find_stop_string("xxSTOPyyEND", 3, ["END", "STOP"]) == (8, "END")
    assert find_stop_string("aaEND", 1, ["END", "aEND"]) == (1, "aEND")
