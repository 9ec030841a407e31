"""`tokenmill train-default`: corpus -> tokenizer -> main and draft models -> model cards.

    tokenmill train-default --out tokenmill/default_models --device cuda --site-packages \\
        --time-budget-s 330 --draft-time-budget-s 45
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from tokenmill.train.corpus import build_corpus, default_roots
from tokenmill.train.tokenizer import EOS, train_code_tokenizer
from tokenmill.train.trainer import (DRAFT_SHAPE, MAIN_SHAPE, TrainConfig, heldout_loss, save_hf_model,
                                     shape_dict, train_model, unigram_loss)

MAIN_NAME, DRAFT_NAME = "tokenmill-code", "tokenmill-code-draft"
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef list_python_files(path):", "class Stack:\n"]


def encode_all(tokenizer, texts: list[str], eos_id: int, device: str) -> torch.Tensor:
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for enc in tokenizer.encode_batch(texts[start:start + 256]):
            ids.extend(enc.ids)
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32, device=device)


def greedy_samples(model_dir: Path, prompts: list[str], device: str, max_tokens: int = 64) -> list[dict]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(str(model_dir), device=device, dtype="bfloat16" if device == "cuda" else "float32",
              max_model_len=1024, num_kv_blocks=256, enforce_eager=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [{"prompt": p, "completion": o.outputs[0].text} for p, o in zip(prompts, outs)]


def model_card(name: str, info: dict) -> str:
    lines = [f"# {name}", "", info["description"], "",
             "| | |", "|---|---|",
             f"| architecture | LlamaForCausalLM, {info['params'] / 1e6:.2f}M parameters, "
             + ", ".join(f"{k} {v}" for k, v in info["shape"].items()) + ", tied embeddings |",
             f"| weights | bf16 safetensors, {info['weights_mb']:.1f} MB |",
             f"| tokenizer | byte-level BPE, {info['vocab_size']} tokens, trained on the same corpus |",
             f"| corpus | {info['corpus']} |",
             f"| training | {info['steps']} steps of {info['batch']} x {info['seq_len']} tokens, "
             f"{info['train_seconds']:.0f} s on {info['device_name']}, seed {info['seed']} |",
             f"| held-out loss | {info['heldout_loss']:.3f} nats/token (perplexity {math.exp(info['heldout_loss']):.1f}) |",
             f"| unigram baseline | {info['unigram_loss']:.3f} nats/token (perplexity {math.exp(info['unigram_loss']):.1f}) |",
             f"| command | `{info['command']}` |", ""]
    if info.get("other"):
        lines += [info["other"], ""]
    lines += ["## Greedy completions (tokenmill, temperature 0)", ""]
    for sample in info.get("samples", []):
        lines += ["```python", sample["prompt"] + sample["completion"], "```", ""]
    lines += ["Loss curve: `training.json` (step, seconds, lr, train and held-out loss).", ""]
    return "\n".join(lines)


def run_train_default(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    corpus = build_corpus(default_roots(args.site_packages), heldout_fraction=args.heldout_fraction,
                          max_total_bytes=args.max_bytes)
    print(json.dumps(corpus.manifest), flush=True)
    tok_dir = out / "_tokenizer"
    tokenizer = train_code_tokenizer(corpus.train[:args.tokenizer_files], tok_dir, vocab_size=args.vocab_size)
    eos_id = tokenizer.token_to_id(EOS)
    train_ids = encode_all(tokenizer, corpus.train, eos_id, device)
    heldout_ids = encode_all(tokenizer, corpus.heldout, eos_id, device)
    vocab = tokenizer.get_vocab_size()
    unigram = unigram_loss(train_ids, heldout_ids, vocab)
    print(f"corpus: {len(train_ids):,} train tokens, {len(heldout_ids):,} held-out tokens, "
          f"unigram loss {unigram:.3f}; {time.perf_counter() - started:.0f} s", flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    corpus_text = (f"Python sources ({', '.join(corpus.manifest['roots'])}) of Python "
                   f"{corpus.manifest['python_version']}: {corpus.manifest['files_train']} files for training, "
                   f"{corpus.manifest['files_heldout']} whole modules held out, {corpus.manifest['bytes'] / 1e6:.1f} MB, "
                   f"{len(train_ids) / 1e6:.1f}M training tokens; file list sha256 "
                   f"{corpus.manifest['file_list_sha256'][:16]}")
    results = {}
    for name, shape, budget in ((MAIN_NAME, MAIN_SHAPE, args.time_budget_s),
                                (DRAFT_NAME, DRAFT_SHAPE, args.draft_time_budget_s)):
        cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, time_budget_s=budget,
                          max_steps=args.max_steps, eval_every=args.eval_every, seed=args.seed)
        t0 = time.perf_counter()
        model, curve = train_model(shape, vocab, eos_id, train_ids, heldout_ids, cfg)
        seconds = time.perf_counter() - t0
        final = heldout_loss(model, heldout_ids, cfg)
        params = sum(p.numel() for p in model.parameters())
        model_dir = save_hf_model(model, tok_dir, out / name, eos_id, {"curve": curve, "config": cfg.__dict__,
                                                                      "corpus": corpus.manifest})
        results[name] = {"params": params, "shape": shape_dict(shape), "heldout_loss": final, "steps": curve[-1]["step"],
                         "train_seconds": seconds, "batch": cfg.batch_size, "seq_len": cfg.seq_len,
                         "weights_mb": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    command = "tokenmill " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for name, description in ((MAIN_NAME, "tokenmill's default model: a small Python code model trained by the "
                                          "project from Python sources every machine has, so `tokenmill serve` "
                                          "and `generate` work with no download."),
                              (DRAFT_NAME, "The draft model for speculative decoding: the same tokenizer as "
                                           "tokenmill-code, about 10x smaller.")):
        info = dict(results[name], description=description, vocab_size=vocab, corpus=corpus_text,
                    device_name=device_name, seed=args.seed, unigram_loss=unigram, command=command)
        other = DRAFT_NAME if name == MAIN_NAME else MAIN_NAME
        info["other"] = (f"{other}: held-out loss {results[other]['heldout_loss']:.3f} nats/token (perplexity "
                         f"{math.exp(results[other]['heldout_loss']):.1f}; {results[other]['params'] / 1e6:.2f}M "
                         "parameters).")
        info["samples"] = greedy_samples(out / name, SAMPLE_PROMPTS + [corpus.heldout[0][:300]] if corpus.heldout
                                         else SAMPLE_PROMPTS, device)
        (out / name / "README.md").write_text(model_card(name, info))
        print(json.dumps({name: {k: v for k, v in info.items() if k in ("params", "heldout_loss", "train_seconds",
                                                                       "weights_mb", "steps")}}), flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s: {out / MAIN_NAME}, {out / DRAFT_NAME}")
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train-default", help="train the project's default code model and its draft")
    parser.add_argument("--out", required=True, help="directory for the two model directories")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--site-packages", action="store_true", help="add installed packages' sources to the corpus")
    parser.add_argument("--max-bytes", type=int, default=None, help="cap on corpus bytes (smoke tests)")
    parser.add_argument("--heldout-fraction", type=float, default=0.03)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer-files", type=int, default=20000, help="train the tokenizer on the first N files")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-budget-s", type=float, default=330.0, help="training time of the main model")
    parser.add_argument("--draft-time-budget-s", type=float, default=45.0)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_train_default)
    return parser
