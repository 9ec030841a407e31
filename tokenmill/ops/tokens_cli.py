"""`tokenmill tokens`: show exactly what the model is fed, to tell a tokenizer or template bug from a
model bug.

    tokenmill tokens --model M --prompt "Hello world"
    tokenmill tokens --model M --chat conversation.json      # [{"role": ..., "content": ...}, ...]

For --chat it prints the rendered chat template first (the text, then its repr so whitespace and
control characters show). Then one row per token: index, id, the vocabulary entry (repr: byte-level
BPE shows as Ġ/Ċ, byte-fallback as <0x..>), the text that token decodes to on its own (repr), a
`special` flag, and the raw bytes of tokens that are only part of a UTF-8 character. Then the id
list and whether decode(ids) gives back the input text. `--json` prints the same as one JSON object.
Tokenization follows the server: a completion prompt gets the tokenizer's special tokens (BOS)
unless --no-special-tokens; a rendered chat template gets none (the template writes them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_chat(path: str) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"chat file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"chat file {path} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in data):
        raise ValueError(f"chat file {path} must hold a list of {{\"role\", \"content\"}} messages "
                         "(or an object with such a \"messages\" list)")
    return data


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def token_bytes(piece: str, text: str) -> bytes:
    """The raw bytes a vocabulary entry stands for (byte-fallback `<0xNN>`, byte-level BPE, or SentencePiece)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    if piece and all(ch in _BYTE_DECODER for ch in piece):
        return bytes(_BYTE_DECODER[ch] for ch in piece)
    if "\ufffd" not in text:
        return text.encode()
    return piece.replace("\u2581", " ").encode()


def token_table(tokenizer, token_ids: list[int]) -> list[dict]:
    hf = tokenizer.hf
    special = set(getattr(hf, "all_special_ids", []) or [])
    pieces = hf.convert_ids_to_tokens(token_ids)
    rows = []
    for i, (tid, piece) in enumerate(zip(token_ids, pieces)):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        is_special = tid in special
        raw = text.encode() if is_special else token_bytes(piece or "", text)
        rows.append({"index": i, "id": tid, "token": piece, "text": text, "bytes": raw.hex(" "),
                     "special": is_special})
    return rows


def inspect(model: str, prompt: str | None = None, chat: list[dict] | None = None, *,
            add_special_tokens: bool = True, add_generation_prompt: bool = True,
            tokenizer_path: str | None = None) -> dict:
    """Everything `tokenmill tokens` prints, as a dict."""
    from tokenmill.tokenizer import Tokenizer

    tokenizer = Tokenizer(Path(tokenizer_path or model))
    rendered = None
    if chat is not None:
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        text, ids = rendered, tokenizer.encode(rendered, add_special_tokens=False)
    else:
        text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    # Special tokens the tokenizer added (BOS) are not in the text: compare without them too.
    round_trip = decoded == text or tokenizer.decode(ids, skip_special_tokens=True) == text
    return {"rendered_template": rendered, "text": text, "token_ids": ids, "num_tokens": len(ids),
            "tokens": token_table(tokenizer, ids), "decoded": decoded, "round_trip": round_trip,
            "vocab_size": tokenizer.vocab_size}


def format_report(report: dict) -> str:
    lines = []
    if report["rendered_template"] is not None:
        lines += ["== rendered chat template ==", report["rendered_template"], "", "== as repr ==",
                  repr(report["rendered_template"]), ""]
    rows = report["tokens"]
    id_width = max([2] + [len(str(r["id"])) for r in rows])
    token_width = min(40, max([5] + [len(repr(r["token"])) for r in rows]))
    lines.append(f"== {report['num_tokens']} tokens ==")
    lines.append(f"{'idx':>5}  {'id':>{id_width}}  {'token':<{token_width}}  text")
    for r in rows:
        flag = "  [special]" if r["special"] else ""
        if "\ufffd" in r["text"]:
            flag += f"  bytes {r['bytes']} (part of a character)"
        lines.append(f"{r['index']:>5}  {r['id']:>{id_width}}  {repr(r['token']):<{token_width}}  {r['text']!r}{flag}")
    lines.append("")
    lines.append(f"ids: {report['token_ids']}")
    if report["round_trip"]:
        lines.append("decode(ids) == text: yes")
    else:
        lines.append("decode(ids) == text: NO")
        lines.append(f"  text:    {report['text']!r}")
        lines.append(f"  decoded: {report['decoded']!r}")
    return "\n".join(lines) + "\n"


def cmd_tokens(args: argparse.Namespace) -> int:
    chat = _load_chat(args.chat) if args.chat else None
    report = inspect(args.model, args.prompt, chat, add_special_tokens=not args.no_special_tokens,
                     add_generation_prompt=not args.no_generation_prompt, tokenizer_path=args.tokenizer)
    if args.json:
        sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_report(report))
    return 0


def add_tokens_parser(subparsers) -> argparse.ArgumentParser:
    """Register `tokenmill tokens` on the CLI's subparsers."""
    p = subparsers.add_parser("tokens", help="show the token ids (and rendered chat template) of a prompt",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model (or tokenizer) directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a completion prompt")
    source.add_argument("--chat", metavar="FILE.json", help="a conversation: JSON list of {role, content}")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="--prompt: do not add the tokenizer's special tokens (BOS)")
    p.add_argument("--no-generation-prompt", action="store_true",
                   help="--chat: render without the assistant turn's opening")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_tokens)
    return p
