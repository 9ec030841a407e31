"""The model's tokenizer (via transformers, so special-token and chat-template rules match HF)."""

from __future__ import annotations

import os
from pathlib import Path

from tokenmill.errors import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """encode/decode/chat templates over a local HF tokenizer directory."""

    def __init__(self, path: str | Path):
        path = Path(path)
        missing = [name for name in TOKENIZER_FILES if not (path / name).exists()]
        if missing:
            raise ModelLoadError(f"tokenizer files missing in {path}: {missing}")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

        try:
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types for bad files; name the cause
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from None
        # The Rust tokenizer directly: decode is on the per-token path, skip the Python wrapper.
        self._backend = getattr(self.hf, "backend_tokenizer", None)
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation to the prompt text the model was trained on."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; use a completion prompt")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
