"""Train a small Llama on token ids and save it as a Hugging Face directory tokenmill loads.

The training loop uses transformers' LlamaForCausalLM (standard, well-tested backward); serving
uses tokenmill's own model code on the same weights. Batches are random windows of the
concatenated corpus drawn from a seeded generator; the learning rate warms up, then follows a
cosine to 10% over the steps the time budget allows (estimated from the first steps).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


# ~19M parameters (37 MB in bf16) with a vocabulary of 8192 and tied embeddings.
MAIN_SHAPE = ModelShape(hidden_size=384, num_layers=10, num_heads=6, num_kv_heads=2, intermediate_size=1024)
# ~1.5M parameters: the draft model for speculative decoding, same tokenizer.
DRAFT_SHAPE = ModelShape(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=384)


@dataclass
class TrainConfig:
    seq_len: int = 512
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    time_budget_s: float = 300.0
    max_steps: int = 100_000
    eval_every: int = 200
    eval_windows: int = 128
    seed: int = 0


def llama_config(shape: ModelShape, vocab_size: int, eos_token_id: int, max_positions: int = 2048):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       intermediate_size=shape.intermediate_size, max_position_embeddings=max_positions,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_id=eos_token_id, pad_token_id=None)


def windows(ids: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return ids[starts[:, None] + torch.arange(length, device=ids.device)[None, :]].long()


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean next-token loss over fixed, evenly spaced windows of the held-out tokens."""
    model.eval()
    count = min(cfg.eval_windows, max(1, (len(ids) - 1) // cfg.seq_len))
    starts = torch.linspace(0, len(ids) - cfg.seq_len - 2, count, device=ids.device).long()
    losses = []
    for chunk in starts.split(32):
        x = windows(ids, chunk, cfg.seq_len + 1)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda):
            losses.append(_loss(model, x))
    model.train()
    return float(torch.stack(losses).mean())


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def unigram_loss(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> float:
    """Held-out cross-entropy of a unigram model of the training tokens (add-one smoothing)."""
    counts = torch.bincount(train_ids.long().cpu(), minlength=vocab_size).double() + 1
    log_p = torch.log(counts / counts.sum())
    return float(-log_p[heldout_ids.long().cpu()].mean())


def train_model(shape: ModelShape, vocab_size: int, eos_token_id: int, train_ids: torch.Tensor,
                heldout_ids: torch.Tensor, cfg: TrainConfig, log=print):
    """Returns (model, loss curve). train_ids/heldout_ids: 1-D int32 tensors on the training device."""
    from transformers import LlamaForCausalLM

    device = train_ids.device
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(shape, vocab_size, eos_token_id)).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    curve = []
    total_steps = cfg.max_steps
    start = time.perf_counter()
    step = 0
    t20 = None
    while step < total_steps:
        # Fit the schedule to the time budget from the step time after warm-up (the first steps
        # pay for kernel selection and allocation): provisionally at step 20, finally at 100.
        if step == 20:
            t20 = time.perf_counter()
            per_step = (t20 - start) / 20
            total_steps = max(101, min(cfg.max_steps, int(cfg.time_budget_s / per_step)))
        elif step == 100 and t20 is not None:
            now = time.perf_counter()
            per_step = (now - t20) / 80
            total_steps = max(101, min(cfg.max_steps, 100 + int((cfg.time_budget_s - (now - start)) / per_step)))
            log(f"{params / 1e6:.1f}M params: {per_step * 1e3:.0f} ms/step -> {total_steps} steps")
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        if step >= cfg.warmup_steps and total_steps > cfg.warmup_steps:
            progress = (step - cfg.warmup_steps) / (total_steps - cfg.warmup_steps)
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - cfg.seq_len - 2, (cfg.batch_size,), generator=gen, device=device)
        x = windows(train_ids, starts, cfg.seq_len + 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = _loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.eval_every == 0 or step == total_steps:
            entry = {"step": step, "seconds": time.perf_counter() - start, "lr": lr, "train_loss": loss.item(),
                     "heldout_loss": heldout_loss(model, heldout_ids, cfg)}
            curve.append(entry)
            log(json.dumps(entry))
    return model, curve


def save_hf_model(model, tokenizer_dir: Path, out_dir: Path, eos_token_id: int, extra: dict | None = None) -> Path:
    """bf16 safetensors + config + generation_config + the tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [eos_token_id], "do_sample": False, "max_new_tokens": 256}, indent=2))
    if extra:
        (out_dir / "training.json").write_text(json.dumps(extra, indent=2))
    return out_dir


def shape_dict(shape: ModelShape) -> dict:
    return asdict(shape)
