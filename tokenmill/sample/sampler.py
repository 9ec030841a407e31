"""Batched sampling: penalties, min_tokens, temperature, top-k, top-p, min-p, seeded draws, logprobs.

Order of operations (documented because outputs depend on it): logprobs are taken from the raw
logits; then repetition, frequency and presence penalties; then the min_tokens mask on stop
tokens; greedy rows take the argmax here. Sampled rows divide by temperature, keep the top-k
tokens, then the smallest set of most likely tokens whose probability reaches top_p
(renormalized after top-k), then drop tokens whose probability is below min_p times the most
likely token's, and draw from what remains.

Draws use the exponential race (argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i):
one vectorized draw for the whole batch, and a request with a seed draws its E from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.engine.messages import TokenLogprobs
from tokenmill.transfer import device_to_host_async, host_to_device


@dataclass
class SamplingMetadata:
    """Per-row sampling inputs for one step (one row per request that samples)."""

    temperature: torch.Tensor  # [R] float32; rows with greedy=True are ignored
    greedy: torch.Tensor  # [R] bool
    top_k: torch.Tensor  # [R] int64, vocab size where disabled
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    all_greedy: bool
    needs_top_k_top_p: bool
    needs_min_p: bool
    generators: dict[int, torch.Generator]  # row -> generator of a seeded request
    # Penalties: None when no row uses them.
    repetition_penalty: torch.Tensor | None  # [R]
    frequency_penalty: torch.Tensor | None  # [R]
    presence_penalty: torch.Tensor | None  # [R]
    prompt_token_ids: torch.Tensor | None  # [R, P] padded with vocab_size
    output_token_ids: torch.Tensor | None  # [R, O] padded with vocab_size
    # min_tokens: (row, token ids to forbid) for rows still below their min_tokens.
    banned_tokens: list[tuple[int, list[int]]]
    max_num_logprobs: int | None  # the largest `logprobs` asked for in the batch, None if none
    num_logprobs: list[int | None]  # per row


def _token_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, L] ids padded with vocab_size -> [R, V] counts of each id."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    vocab_size = logits.shape[1]
    output_counts = _token_mask(meta.output_token_ids, vocab_size)
    if meta.repetition_penalty is not None:
        seen = (_token_mask(meta.prompt_token_ids, vocab_size) + output_counts) > 0
        penalty = meta.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if meta.frequency_penalty is not None:
        logits = logits - meta.frequency_penalty[:, None] * output_counts
    if meta.presence_penalty is not None:
        logits = logits - meta.presence_penalty[:, None] * (output_counts > 0).float()
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token once the more likely ones already reach top_p (the most likely always stays).
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    exp = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        exp.exponential_()
    for row, gen in generators.items():
        exp[row].exponential_(generator=gen)
    return probs.div(exp).argmax(dim=-1)


class Sampler:
    """Turns the logits of the rows that sample into token ids (and logprobs when asked)."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata):
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        if meta.output_token_ids is not None:
            logits = apply_penalties(logits, meta)
        if meta.banned_tokens:
            rows = [row for row, token_ids in meta.banned_tokens for _ in token_ids]
            cols = [t for _, token_ids in meta.banned_tokens for t in token_ids]
            index = host_to_device(rows + cols, torch.long, logits.device)  # no sync, unlike a list index
            logits = logits.index_put((index[:len(rows)], index[len(rows):]),
                                      torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device))
        greedy_tokens = logits.argmax(dim=-1)
        if meta.all_greedy:
            tokens = greedy_tokens
        else:
            temperature = torch.where(meta.greedy, torch.ones_like(meta.temperature), meta.temperature)
            logits = logits / temperature[:, None]
            if meta.needs_top_k_top_p:
                logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
            probs = logits.softmax(dim=-1)
            if meta.needs_min_p:
                threshold = meta.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
                probs = probs.masked_fill(probs < threshold, 0.0)
            tokens = torch.where(meta.greedy, greedy_tokens, random_sample(probs, meta.generators))
        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, tokens, meta)
        return tokens, logprobs


def _gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, meta: SamplingMetadata) -> "DeferredLogprobs":
    """Computed on the device and copied to the host without waiting; rows that did not ask get None."""
    sampled = raw.gather(1, tokens[:, None]).squeeze(1)
    ranks = (raw > sampled[:, None]).sum(dim=-1) + 1
    top_values, top_ids = raw.topk(meta.max_num_logprobs, dim=-1) if meta.max_num_logprobs else (None, None)
    return DeferredLogprobs(sampled, ranks, top_values, top_ids, meta.num_logprobs)


class DeferredLogprobs(Sequence):
    """The batch's logprobs as a sequence of TokenLogprobs | None per row. The device-to-host copies
    start at once; the lists are built on first access, which must come after the step's tokens were
    read (the model runner's LaunchedStep.result waits for the same stream point)."""

    def __init__(self, sampled, ranks, top_values, top_ids, num_logprobs: list[int | None]):
        self._parts = [None if t is None else device_to_host_async(t) for t in (sampled, ranks, top_values, top_ids)]
        self._num_logprobs = num_logprobs
        self._rows: list[TokenLogprobs | None] | None = None

    def _build(self) -> list[TokenLogprobs | None]:
        if self._rows is None:
            sampled, ranks, top_values, top_ids = (None if t is None else t.tolist() for t in self._parts)
            self._rows = [None if n is None else TokenLogprobs(
                sampled_logprob=sampled[row], sampled_rank=ranks[row],
                top_token_ids=top_ids[row][:n] if n else [], top_logprobs=top_values[row][:n] if n else [])
                for row, n in enumerate(self._num_logprobs)]
        return self._rows

    def __getitem__(self, index):
        return self._build()[index]

    def __len__(self) -> int:
        return len(self._num_logprobs)
