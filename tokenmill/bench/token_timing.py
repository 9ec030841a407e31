"""Token timing: what one user sees over a long completion, given an inter-token latency distribution.

The seed's point: a token that is slow 1 time in 20 (the p95) is not rare for a user reading a
1,000-token answer: they meet about 50 of them. This module draws the ITLs of simulated completions
from a measured distribution (the per-token ITLs of a run, resampled independently) or a parametric one
(lognormal from a median and a p99, optionally with a fraction of stall tokens) and counts stalls over a
threshold and the longest stall. Independent resampling ignores correlation between successive tokens
(a long prefill of another request delays every stream at once, but one stream rarely twice in a row).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

Z99 = 2.3263478740408408   # standard normal quantile at 0.99


@dataclass
class ITLModel:
    """Where ITLs come from: `samples` (seconds), or a lognormal with `median_s` and `p99_s`, plus
    optionally a fraction `stall_fraction` of tokens that take `stall_s` instead."""
    samples: np.ndarray | None = None
    median_s: float | None = None
    p99_s: float | None = None
    stall_fraction: float = 0.0
    stall_s: float = 0.0

    def __post_init__(self):
        if self.samples is not None:
            self.samples = np.asarray(self.samples, dtype=float)
            if self.samples.size == 0:
                raise ValueError("no ITL samples (no successful request with 2+ tokens)")
        elif self.median_s is None:
            raise ValueError("give ITL samples or a median (and p99)")
        elif self.p99_s is not None and self.p99_s < self.median_s:
            raise ValueError("p99 must be >= the median")

    def draw(self, rng: np.random.Generator, shape) -> np.ndarray:
        if self.samples is not None:
            return rng.choice(self.samples, size=shape, replace=True)
        sigma = math.log(self.p99_s / self.median_s) / Z99 if self.p99_s else 0.0
        out = self.median_s * np.exp(sigma * rng.standard_normal(shape))
        if self.stall_fraction > 0:
            out = np.where(rng.random(shape) < self.stall_fraction, self.stall_s, out)
        return out

    def describe(self) -> str:
        if self.samples is not None:
            return f"{self.samples.size} measured per-token ITLs, resampled independently"
        text = f"lognormal, median {self.median_s * 1e3:g} ms"
        if self.p99_s:
            text += f", p99 {self.p99_s * 1e3:g} ms"
        if self.stall_fraction:
            text += f", {self.stall_fraction:.1%} of tokens stall {self.stall_s * 1e3:g} ms"
        return text


@dataclass
class TokenTiming:
    source: str
    tokens: int
    completions: int
    threshold_s: float
    itl_p50_s: float
    itl_p95_s: float
    itl_p99_s: float
    p_token_stall: float             # P(one token's ITL > threshold)
    mean_stalls: float               # per completion
    p_any_stall: float               # share of completions with at least one stall
    longest_stall_p50_s: float       # median over completions of the longest ITL
    longest_stall_p90_s: float
    decode_time_p50_s: float         # sum of the ITLs (time from first to last token)
    decode_time_p99_s: float
    slow_tokens_at_p95: float        # tokens slower than the p95 ITL per completion (= 5% of tokens)
    slow_tokens_at_p99: float
    example_itls: list[float]        # one simulated completion (for the plot)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
        return [
            f"ITL source: {self.source}",
            f"ITL p50 {ms(self.itl_p50_s)}, p95 {ms(self.itl_p95_s)}, p99 {ms(self.itl_p99_s)}",
            f"a {self.tokens}-token completion meets about {self.slow_tokens_at_p95:.0f} tokens slower than the p95 "
            f"({ms(self.itl_p95_s)}) and {self.slow_tokens_at_p99:.0f} slower than the p99 ({ms(self.itl_p99_s)}): "
            f"1 token in 20 is not rare for one user, the median ({ms(self.itl_p50_s)}) hides it",
            f"stalls over {ms(self.threshold_s)}: {self.mean_stalls:.1f} per completion on average; "
            f"{self.p_any_stall:.0%} of completions have at least one",
            f"longest stall per completion: median {ms(self.longest_stall_p50_s)}, p90 {ms(self.longest_stall_p90_s)}",
            f"first-to-last token: median {self.decode_time_p50_s:.2f} s, p99 {self.decode_time_p99_s:.2f} s",
        ]


def simulate(model: ITLModel, tokens: int = 1000, threshold_s: float | None = None, completions: int = 2000,
             seed: int = 0) -> TokenTiming:
    """Simulate `completions` completions of `tokens` tokens (tokens - 1 ITLs each). The stall threshold
    defaults to 3x the median ITL and at least 100 ms: a pause a reader notices."""
    if tokens < 2:
        raise ValueError("a completion needs at least 2 tokens to have inter-token latencies")
    rng = np.random.default_rng(seed)
    itls = model.draw(rng, (completions, tokens - 1))
    flat = itls.ravel()
    p50, p95, p99 = (float(v) for v in np.percentile(flat, [50, 95, 99]))
    if threshold_s is None:
        threshold_s = max(3 * p50, 0.1)
    stalls = (itls > threshold_s).sum(axis=1)
    longest = itls.max(axis=1)
    decode = itls.sum(axis=1)
    reference = model.draw(np.random.default_rng(seed + 1), 200_000) if model.samples is None else model.samples
    p_stall = float(np.mean(reference > threshold_s))
    return TokenTiming(
        source=model.describe(), tokens=tokens, completions=completions, threshold_s=threshold_s,
        itl_p50_s=p50, itl_p95_s=p95, itl_p99_s=p99, p_token_stall=p_stall,
        mean_stalls=float(stalls.mean()), p_any_stall=float(np.mean(stalls > 0)),
        longest_stall_p50_s=float(np.percentile(longest, 50)), longest_stall_p90_s=float(np.percentile(longest, 90)),
        decode_time_p50_s=float(np.percentile(decode, 50)), decode_time_p99_s=float(np.percentile(decode, 99)),
        slow_tokens_at_p95=float(np.mean((itls > p95).sum(axis=1))),
        slow_tokens_at_p99=float(np.mean((itls > p99).sum(axis=1))),
        example_itls=[float(v) for v in itls[0]])
