"""Incremental detokenization and stop-string matching for one generated sequence.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece-style tokenizers (a token's leading space depends on what precedes it). So each new
token is decoded together with a few tokens before it, and text is released only once it no longer
ends in an incomplete UTF-8 sequence (U+FFFD).
"""

from __future__ import annotations

from tokenmill.tokenizer import Tokenizer

# Prompt tokens kept as left context for the first output tokens (as vLLM does).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the sequence: release held-back text, incomplete characters as U+FFFD."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta


def find_stop_string(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last `new_chars` characters of `text`,
    as (start index, stop string)."""
    best = None
    for stop in stops:
        begin = max(0, len(text) - new_chars - len(stop) + 1)
        index = text.find(stop, begin)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
