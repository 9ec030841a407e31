"""The sampler against hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.sample.sampler import Sampler, SamplingMetadata, apply_penalties, apply_top_k_top_p

V = 6


def metadata(rows=1, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False, seeds=None,
             rep=None, freq=None, pres=None, prompt=None, output=None, banned=(), logprobs=None):
    full = lambda value, dtype=torch.float32: torch.full((rows,), value, dtype=dtype)
    pad = lambda lists: torch.tensor([x + [V] * (max(map(len, lists)) - len(x)) for x in lists])
    return SamplingMetadata(
        temperature=full(temperature), greedy=full(greedy, torch.bool),
        top_k=full(top_k if top_k else V, torch.long), top_p=full(top_p), min_p=full(min_p),
        all_greedy=greedy, needs_top_k_top_p=bool(top_k) or top_p < 1.0, needs_min_p=min_p > 0,
        generators={r: torch.Generator().manual_seed(s) for r, s in enumerate(seeds or [])},
        repetition_penalty=full(rep) if rep else None, frequency_penalty=full(freq) if freq else None,
        presence_penalty=full(pres) if pres else None,
        prompt_token_ids=pad(prompt) if prompt else None, output_token_ids=pad(output) if output else None,
        banned_tokens=list(banned), max_num_logprobs=logprobs, num_logprobs=[logprobs] * rows)


def draw_support(logits: torch.Tensor, draws: int = 400, **kwargs) -> dict[int, int]:
    """Counts of tokens drawn over `draws` independently seeded draws."""
    counts: dict[int, int] = {}
    for seed in range(draws):
        token, _ = Sampler()(logits.clone(), metadata(seeds=[seed], **kwargs))
        counts[int(token)] = counts.get(int(token), 0) + 1
    return counts


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.04, 0.01, 0.0]])
LOGITS = torch.log(PROBS.clamp_min(1e-30))


def test_top_k_keeps_only_k_most_likely():
    assert set(draw_support(LOGITS, top_k=2)) == {0, 1}


@pytest.mark.parametrize("top_p, kept", [(0.45, {0}), (0.7, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}),
                                         (0.96, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    masked = apply_top_k_top_p(LOGITS.clone(), torch.tensor([V]), torch.tensor([top_p]))
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == kept


def test_top_p_renormalizes_after_top_k():
    # top-k 3 leaves {0.5, 0.3, 0.15} -> renormalized 0.526, 0.316, 0.158; top_p 0.83 then needs 0 and 1 only
    # (without renormalizing, 0.5 + 0.3 < 0.83 would keep token 2 too)
    masked = apply_top_k_top_p(LOGITS.clone(), torch.tensor([3]), torch.tensor([0.83]))
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_max():
    # threshold 0.35 * 0.5 = 0.175: tokens 0 (0.5) and 1 (0.3) stay
    assert set(draw_support(LOGITS, min_p=0.35)) == {0, 1}


def test_temperature_sampling_matches_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0, -9.0]])
    draws = 3000
    counts = draw_support(logits, draws=draws, temperature=0.7)
    expected = torch.softmax(logits[0] / 0.7, -1)
    for token in range(4):
        p = float(expected[token])
        assert abs(counts.get(token, 0) / draws - p) < 4 * math.sqrt(p * (1 - p) / draws) + 1e-3


def test_penalties_exact():
    logits = torch.tensor([[1.0, -1.0, 0.5, 2.0, 0.0, 0.0]])
    # repetition 2.0 on tokens seen in prompt [0] or output [1, 3, 3]: positive / 2, negative * 2
    out = apply_penalties(logits, metadata(rep=2.0, prompt=[[0]], output=[[1, 3, 3]]))
    assert out.tolist() == [[0.5, -2.0, 0.5, 1.0, 0.0, 0.0]]
    # frequency 0.5 * count + presence 0.25 over output tokens only (prompt token 0 untouched)
    out = apply_penalties(logits, metadata(freq=0.5, pres=0.25, prompt=[[0]], output=[[1, 3, 3]]))
    assert out.tolist() == [[1.0, -1.75, 0.5, 0.75, 0.0, 0.0]]


def test_banned_tokens_and_greedy():
    token, _ = Sampler()(LOGITS.clone(), metadata(greedy=True))
    assert int(token) == 0
    token, _ = Sampler()(LOGITS.clone(), metadata(greedy=True, banned=[(0, [0])]))
    assert int(token) == 1


def test_seeded_draws_do_not_depend_on_batch():
    logits = torch.randn(1, V)
    alone = [int(Sampler()(logits.clone(), metadata(seeds=[s]))[0]) for s in range(20)]
    batch = logits.repeat(3, 1)
    together = []
    for s in range(20):
        meta = metadata(rows=3, seeds=[99, s, 5])
        meta.generators = {1: torch.Generator().manual_seed(s)}  # rows 0 and 2 unseeded
        together.append(int(Sampler()(batch.clone(), meta)[0][1]))
    assert alone == together


def test_logprobs_are_raw_and_ranked():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, -2.0]])
    # greedy after a presence penalty picks token 1 anyway; logprobs come from the raw logits
    token, logprobs = Sampler()(logits.clone(), metadata(greedy=True, logprobs=2))
    raw = torch.log_softmax(logits[0], -1)
    lp = logprobs[0]
    assert int(token) == 1 and lp.sampled_rank == 1
    assert lp.sampled_logprob == pytest.approx(float(raw[1]))
    assert lp.top_token_ids == [1, 3]
    assert lp.top_logprobs == pytest.approx([float(raw[1]), float(raw[3])])
    token, logprobs = Sampler()(logits.clone(), metadata(greedy=True, banned=[(0, [1, 3])], logprobs=0))
    assert int(token) == 2 and logprobs[0].sampled_rank == 3 and logprobs[0].top_token_ids == []
