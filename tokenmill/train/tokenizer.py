"""The default models' tokenizer: byte-level BPE trained on the corpus, with a chat template for a
code model (conversation turns become `#` comment lines; the model answers with code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>", "<|im_start|>", "<|im_end|>"]  # ids 0..3

# System and user turns render as comment lines, assistant turns as they are: a code model then
# "answers" a request by writing the code under it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] }}\n"
    "{%- else -%}{%- for line in message['content'].split('\n') -%}{{ '# ' + line + '\n' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def train_code_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192,
                         model_max_length: int = 2048) -> Tokenizer:
    """Train and write tokenizer.json + tokenizer_config.json (+ special_tokens_map.json)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": "<|pad|>",
              "bos_token": None, "unk_token": None, "model_max_length": model_max_length,
              "add_bos_token": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS, "pad_token": "<|pad|>"}, indent=2))
    return tokenizer
