"""Per-request measurements and run aggregates.

Definitions (all clocks monotonic, ``time.perf_counter``; times relative to the moment the request was sent):
- TTFT: arrival of the first chunk that carries at least one output token.
- ITL, per token: a chunk that carries k tokens and arrives g seconds after the previous token-carrying
  chunk contributes k inter-token latencies of g/k each; the k-1 tokens that arrive together with the
  first token contribute 0. A request with n tokens has n-1 ITLs summing to TTLT - TTFT. Tokens per
  chunk are exact when the server returns ``token_ids`` in chunks (tokenmill's and vLLM's
  ``return_token_ids``); otherwise each chunk with text counts as one token, and when the server's
  ``usage`` reports a different total, each gap is divided by the mean tokens per chunk (``itl_basis``
  is then ``chunks``). vLLM's own ITL is the raw gap between chunks.
- TPOT = (E2E - TTFT) / (output tokens - 1) (vLLM's definition); undefined for one-token outputs.
- TTLT (time to last token): arrival of the last token-carrying chunk.
- E2E latency: arrival of ``data: [DONE]``.
- output tokens: the server's ``usage.completion_tokens`` when sent, else the count from the chunks.
- status: ``ok``; ``error`` (HTTP error status, connection refused, error event in the stream);
  ``timeout`` (no complete response within the request timeout); ``incomplete`` (stream cut off,
  no [DONE], no tokens, or fewer tokens than max_tokens with ignore_eos). Only ``ok`` requests enter
  latency and throughput statistics.
- percentiles: linear interpolation between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from tokenmill.bench.workload import SLO

STATUSES = ("ok", "error", "timeout", "incomplete")
LATENCIES = ("ttft", "tpot", "itl", "ttlt", "e2el")
STAT_KEYS = ("mean", "min", "p10", "p50", "p90", "p95", "p99", "max")

DEFINITIONS = {
    "clock": "time.perf_counter (monotonic); times in seconds from the moment the request was sent",
    "ttft": "arrival of the first chunk carrying at least one output token",
    "itl": "per token: a chunk carrying k tokens, g s after the previous token-carrying chunk, counts as k "
           "latencies of g/k; tokens arriving with the first token count 0; n tokens give n-1 ITLs summing to "
           "TTLT - TTFT. Exact tokens per chunk from token_ids (return_token_ids); otherwise one per text chunk, "
           "rescaled by usage.completion_tokens (itl_basis 'chunks')",
    "tpot": "(E2E - TTFT) / (output tokens - 1)",
    "ttlt": "time to last token: arrival of the last token-carrying chunk",
    "e2el": "end-to-end latency: arrival of data: [DONE]",
    "tokens_per_s_per_user": "per request (output tokens - 1) / (TTLT - TTFT): the decode speed one user sees",
    "percentiles": "linear interpolation between order statistics",
    "goodput": "requests/s that succeeded and met every SLO limit individually",
    "slo_met": "the SLO percentile of each limited metric is within its limit and the error rate within its limit",
    "throughput": "successful requests' tokens / run duration (first send to last response end)",
    "mtok_per_dollar": "million tokens per dollar at the measured throughput and the GPU price",
}


@dataclass
class RequestRecord:
    index: int
    conversation: int = 0
    turn: int = 0
    scheduled_s: float = 0.0        # intended send time, from the run's start
    send_s: float = 0.0             # actual send time, from the run's start
    end_s: float = 0.0              # when the response ended (or failed), from the run's start
    input_tokens: int = 0           # prompt tokens as built (server's usage.prompt_tokens when sent)
    cached_tokens: int | None = None
    max_tokens: int = 0
    status: str = "ok"
    error_kind: str | None = None   # e.g. http_503, error_event, connection, cut_off, no_done, short, no_tokens
    error: str | None = None
    http_status: int | None = None
    finish_reason: str | None = None
    output_tokens: int = 0
    ttft: float | None = None
    ttlt: float | None = None
    e2el: float | None = None
    tpot: float | None = None
    itl_basis: str = "token_ids"    # token_ids | chunks
    chunks: list[tuple[float, int]] = field(default_factory=list)   # (time since send, tokens in chunk)
    itls: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tokens_per_s_per_user(self) -> float | None:
        if self.output_tokens < 2 or self.ttlt is None or self.ttft is None or self.ttlt <= self.ttft:
            return None
        return (self.output_tokens - 1) / (self.ttlt - self.ttft)

    def to_dict(self, with_chunks: bool = True) -> dict:
        out = asdict(self)
        out.pop("itls")
        out["tokens_per_s_per_user"] = self.tokens_per_s_per_user
        if with_chunks:
            out["chunks"] = [[round(t, 6), k] for t, k in self.chunks]
        else:
            out.pop("chunks")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RequestRecord":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        record = cls(**data)
        record.chunks = [(float(t), int(k)) for t, k in record.chunks]
        if record.ok:
            record.itls = per_token_itls(record.chunks, record.output_tokens)[0]
        return record


def per_token_itls(chunks: list[tuple[float, int]], output_tokens: int | None = None) -> tuple[list[float], str]:
    """Per-token inter-token latencies from (arrival time, tokens in chunk) of token-carrying chunks.

    With exact counts (sum of k == output_tokens, or output_tokens unknown) each chunk of k tokens after
    the first gives k values gap/k and the first chunk gives k-1 zeros. Otherwise (``chunks`` basis) each
    gap is divided by the mean number of tokens per chunk, (output_tokens - k1) / (chunks - 1)."""
    chunks = [(t, k) for t, k in chunks if k > 0]
    if not chunks:
        return [], "token_ids"
    counted = sum(k for _, k in chunks)
    if output_tokens is None or output_tokens == counted:
        itls = [0.0] * (chunks[0][1] - 1)
        for (t0, _), (t1, k) in zip(chunks, chunks[1:]):
            itls.extend([(t1 - t0) / k] * k)
        return itls, "token_ids"
    if len(chunks) < 2:
        return [], "chunks"
    per_chunk = (output_tokens - chunks[0][1]) / (len(chunks) - 1)
    if per_chunk <= 0:
        return [], "chunks"
    return [(t1 - t0) / per_chunk for (t0, _), (t1, _) in zip(chunks, chunks[1:])], "chunks"


def finalize(record: RequestRecord, exact_counts: bool, ignore_eos: bool) -> RequestRecord:
    """Derive TTFT/TTLT/TPOT/ITL and the final status from a record's chunks, usage and end."""
    token_chunks = [(t, k) for t, k in record.chunks if k > 0]
    if token_chunks:
        record.ttft = token_chunks[0][0]
        record.ttlt = token_chunks[-1][0]
    if record.status != "ok":
        return record
    if not token_chunks:
        record.status, record.error_kind = "incomplete", "no_tokens"
        record.error = "the stream ended without output tokens"
        return record
    if ignore_eos and record.output_tokens < record.max_tokens:
        record.status, record.error_kind = "incomplete", "short"
        record.error = f"{record.output_tokens} of {record.max_tokens} tokens (ignore_eos)"
        return record
    counted = sum(k for _, k in token_chunks)
    record.itls, record.itl_basis = per_token_itls(
        token_chunks, None if exact_counts and counted == record.output_tokens else record.output_tokens)
    if not exact_counts and counted == record.output_tokens:
        record.itl_basis = "chunks"   # one token per chunk was assumed and agrees with usage
    if record.output_tokens > 1 and record.e2el is not None:
        record.tpot = (record.e2el - record.ttft) / (record.output_tokens - 1)
    return record


# ---- aggregates -------------------------------------------------------------------------------------------

def stats(values) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {key: None for key in STAT_KEYS} | {"count": 0}
    pct = np.percentile(arr, [10, 50, 90, 95, 99])
    return {"mean": float(arr.mean()), "min": float(arr.min()), "p10": float(pct[0]), "p50": float(pct[1]),
            "p90": float(pct[2]), "p95": float(pct[3]), "p99": float(pct[4]), "max": float(arr.max()),
            "count": int(arr.size)}


def percentile(values, q: float) -> float | None:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None


def meets_every_limit(record: RequestRecord, limits: dict[str, float]) -> bool:
    """One request against every SLO limit (seconds). ITL: each of its tokens; TPOT: undefined = met."""
    if not record.ok:
        return False
    for metric, limit in limits.items():
        if metric == "itl":
            if record.itls and max(record.itls) > limit:
                return False
            continue
        value = getattr(record, metric)
        if value is not None and value > limit:
            return False
    return True


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO | None = None,
              dollars_per_hour: float | None = None) -> dict:
    """Aggregates of one run. duration_s: the run's wall time (first send to last response end)."""
    ok = [r for r in records if r.ok]
    counts = {status: sum(r.status == status for r in records) for status in STATUSES}
    kinds: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kinds[r.error_kind or r.status] = kinds.get(r.error_kind or r.status, 0) + 1
    input_tokens = sum(r.input_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    itls = [v for r in ok for v in r.itls]
    out = {
        "requests": len(records), "completed": len(ok), "status_counts": counts, "failure_kinds": kinds,
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "duration_s": duration_s,
        "request_throughput": per(len(ok)),
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "input_throughput": per(input_tokens), "output_throughput": per(output_tokens),
        "total_token_throughput": per(input_tokens + output_tokens),
        "mean_input_tokens": input_tokens / len(ok) if ok else None,
        "mean_output_tokens": output_tokens / len(ok) if ok else None,
        "cached_tokens": sum(r.cached_tokens or 0 for r in ok),
        "ttft": stats(r.ttft for r in ok), "tpot": stats(r.tpot for r in ok), "itl": stats(itls),
        "ttlt": stats(r.ttlt for r in ok), "e2el": stats(r.e2el for r in ok),
        "tokens_per_s_per_user": stats(r.tokens_per_s_per_user for r in ok),
        "itl_basis": sorted({r.itl_basis for r in ok}),
        "max_concurrency_observed": max_concurrency(records),
    }
    out["cache_hit_rate"] = out["cached_tokens"] / input_tokens if input_tokens and any(
        r.cached_tokens is not None for r in ok) else None
    if slo is not None:
        out["slo"] = slo_verdict(records, slo, duration_s)
    if dollars_per_hour:
        out["cost"] = cost_figures(out, dollars_per_hour)
    return out


def slo_verdict(records: list[RequestRecord], slo: SLO, duration_s: float) -> dict:
    ok = [r for r in records if r.ok]
    limits = slo.limits()
    checks = {}
    for metric, limit in limits.items():
        values = [v for r in ok for v in r.itls] if metric == "itl" else [getattr(r, metric) for r in ok]
        value = percentile(values, slo.percentile)
        checks[metric] = {"percentile": slo.percentile, "value": value, "limit": limit,
                          "met": value is not None and value <= limit}
    error_rate = (len(records) - len(ok)) / len(records) if records else 0.0
    good = sum(meets_every_limit(r, limits) for r in records)
    met = bool(ok) and all(c["met"] for c in checks.values()) and error_rate <= slo.max_error_rate
    return {"met": met, "checks": checks, "error_rate": error_rate, "max_error_rate": slo.max_error_rate,
            "good_requests": good, "attainment": good / len(records) if records else 0.0,
            "goodput": good / duration_s if duration_s > 0 else 0.0}


def cost_figures(summary: dict, dollars_per_hour: float) -> dict:
    """Megatokens per dollar and dollars per megatoken at the run's throughput."""
    def per_dollar(tok_s):
        return tok_s * 3600 / 1e6 / dollars_per_hour if dollars_per_hour else None

    out_mtok = per_dollar(summary["output_throughput"])
    total_mtok = per_dollar(summary["total_token_throughput"])
    return {"dollars_per_hour": dollars_per_hour, "output_mtok_per_dollar": out_mtok,
            "total_mtok_per_dollar": total_mtok,
            "dollars_per_output_mtok": 1 / out_mtok if out_mtok else None,
            "dollars_per_total_mtok": 1 / total_mtok if total_mtok else None}


def max_concurrency(records: list[RequestRecord]) -> int:
    events = sorted([(r.send_s, 1) for r in records] + [(r.end_s, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def is_finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)
