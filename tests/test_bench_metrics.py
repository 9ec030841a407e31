"""Metric math of `tokenmill bench`: exact, against a scripted server on a fake clock, and pure."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tokenmill.bench.client import BenchRequest, Target, discover, make_http_client, send
from tokenmill.bench.metrics import RequestRecord, finalize, per_token_itls, stats, summarize
from tokenmill.bench.runner import Bench
from tokenmill.bench.workload import SLO, Cost, LengthDist, Workload
from tokenmill.testing.scripted_server import FakeClock, Script, ScriptedServer

approx = lambda x: pytest.approx(x, abs=1e-9)  # noqa: E731


def fixed_workload(n: int, output: int = 10, slo: SLO | None = None) -> Workload:
    return Workload(name="t", num_requests=n, input_tokens=LengthDist("fixed", value=8),
                    output_tokens=LengthDist("fixed", value=output), slo=slo or SLO(), cost=Cost(3.6, 1))


def run_sequential(scripts: list[Script], workload: Workload, timeout: float = 5.0):
    clock = FakeClock()
    with ScriptedServer(lambda body, i: scripts[i], clock=clock) as server:
        async def go():
            async with Bench(Target(server.url), workload, clock=clock, request_timeout=timeout,
                             return_token_ids="on") as bench:
                return await bench.sequential(len(scripts))
        return asyncio.run(go()), server


# ---- exact, through HTTP, on the fake clock ---------------------------------------------------------------

def test_ttft_itl_tpot_ttlt_exact_one_token_per_chunk():
    run, server = run_sequential([Script(ttft=0.05, itl=0.01, tokens=10, done_delay=0.002)], fixed_workload(1))
    r = run.records[0]
    assert r.ok and r.output_tokens == 10 and r.itl_basis == "token_ids"
    assert r.ttft == approx(0.05)
    assert r.itls == [approx(0.01)] * 9
    assert r.ttlt == approx(0.14)
    assert r.e2el == approx(0.142)
    assert r.tpot == approx((0.142 - 0.05) / 9)            # (E2E - TTFT) / (tokens - 1)
    assert r.tokens_per_s_per_user == approx(9 / 0.09)
    assert server.requests[0]["stream_options"] == {"include_usage": True}
    assert server.requests[0]["prompt"] and len(server.requests[0]["prompt"]) == 8


def test_chunk_with_k_tokens_counts_as_k_tokens():
    # chunks of 2, 3, 1, 4 tokens; gaps 0.03, 0.01, 0.08 after a TTFT of 0.1
    script = Script(ttft=0.1, itl=[0.03, 0.01, 0.08], tokens=10, tokens_per_chunk=[2, 3, 1, 4])
    r = run_sequential([script], fixed_workload(1))[0].records[0]
    assert [k for _, k in r.chunks] == [2, 3, 1, 4]
    assert r.itls == [0.0] + [approx(0.01)] * 3 + [approx(0.01)] + [approx(0.02)] * 4
    assert len(r.itls) == 9 and sum(r.itls) == approx(r.ttlt - r.ttft) and r.ttlt == approx(0.22)
    assert r.tpot == approx((0.22 - 0.1) / 9)


def test_without_token_ids_chunks_are_rescaled_by_usage():
    # the server sends 2 tokens per chunk but no token_ids: one token per chunk assumed, usage says 10
    script = Script(ttft=0.1, itl=0.02, tokens=10, tokens_per_chunk=2, send_token_ids=False)
    r = run_sequential([script], fixed_workload(1))[0].records[0]
    assert r.ok and r.output_tokens == 10 and r.itl_basis == "chunks"
    # 5 chunks, 4 gaps of 0.02 s; the first chunk counts as 1 token, so each later one as (10 - 1) / 4
    assert r.itls == [approx(0.02 / ((10 - 1) / 4))] * 4


def test_aggregates_percentiles_goodput_and_slo_exact():
    ttfts = [0.05, 0.2, 0.08, 0.12]
    scripts = [Script(ttft=t, itl=0.01 * (i + 1), tokens=5) for i, t in enumerate(ttfts)]
    slo = SLO(percentile=90, ttft_ms=100, max_error_rate=0.0)
    run, _ = run_sequential(scripts, fixed_workload(4, output=5, slo=slo))
    s = run.summary
    durations = [t + 4 * 0.01 * (i + 1) for i, t in enumerate(ttfts)]   # back to back on the fake clock
    assert s["duration_s"] == approx(sum(durations))
    assert s["request_throughput"] == approx(4 / sum(durations))
    assert s["output_throughput"] == approx(20 / sum(durations))
    assert s["input_throughput"] == approx(4 * 8 / sum(durations))   # usage.prompt_tokens = 8 ids
    assert s["ttft"]["mean"] == approx(np.mean(ttfts))
    assert s["ttft"]["p50"] == approx(0.1)                            # (0.08 + 0.12) / 2
    assert s["ttft"]["p90"] == approx(0.12 + 0.7 * 0.08)              # linear interpolation, rank 2.7
    assert s["ttft"]["max"] == approx(0.2)
    assert s["tpot"]["p50"] == approx(0.025)                          # TPOTs 0.01..0.04
    assert s["itl"]["count"] == 16 and s["itl"]["mean"] == approx(0.025)
    verdict = s["slo"]
    assert verdict["good_requests"] == 2 and verdict["goodput"] == approx(2 / sum(durations))
    assert verdict["checks"]["ttft"]["value"] == approx(0.176) and not verdict["met"]
    assert s["cost"]["output_mtok_per_dollar"] == approx(20 / sum(durations) * 3600 / 1e6 / 3.6)


def test_failures_are_counted_by_kind_and_kept_out_of_latency_stats():
    scripts = [Script(ttft=0.05, itl=0.01, tokens=10),
               Script(fail="cut", cut_after=2),          # cut off after its first tokens: not a success
               Script(fail="http_500"),
               Script(fail="http_503"),
               Script(fail="error_event", cut_after=3),
               Script(fail="short", short_by=3),         # fewer tokens than max_tokens with ignore_eos
               Script(fail="no_done"),
               Script(fail="hang"),
               Script(ttft=0.07, itl=0.01, tokens=10)]
    run, _ = run_sequential(scripts, fixed_workload(len(scripts)), timeout=0.5)
    s = run.summary
    assert s["status_counts"] == {"ok": 2, "error": 3, "timeout": 1, "incomplete": 3}
    assert s["failure_kinds"] == {"cut_off": 1, "http_500": 1, "http_503": 1, "error_event": 1, "short": 1,
                                  "no_done": 1, "timeout": 1}
    kinds = {r.index: (r.status, r.error_kind) for r in run.records}
    assert kinds[1] == ("incomplete", "cut_off") and run.records[1].ttft == approx(0.05)
    assert kinds[5] == ("incomplete", "short") and "7 of 10" in run.records[5].error
    assert s["completed"] == 2 and s["error_rate"] == approx(7 / 9)
    assert s["ttft"]["count"] == 2 and s["ttft"]["mean"] == approx(0.06)
    assert s["itl"]["count"] == 18 and s["output_tokens"] == 20


# ---- real time (scheduling jitter tolerated) ----------------------------------------------------------

def test_real_clock_matches_the_script_within_jitter():
    with ScriptedServer(Script(ttft=0.05, itl=0.01, tokens=6)) as server:
        async def go():
            async with make_http_client(4, 10) as http:
                target = await discover(http, Target(server.url))
                assert target.can_tokenize and not target.return_token_ids   # auto: only for tokenmill
                return await send(http, target, BenchRequest(0, 6, 3, prompt_ids=[1, 2, 3]))
        record, reply = asyncio.run(go())
    assert record.ok and record.output_tokens == 6 and record.itl_basis == "chunks"
    assert 0.045 <= record.ttft <= 0.12
    assert all(0.005 <= v <= 0.06 for v in record.itls) and len(record.itls) == 5
    assert reply.text == " t0 t1 t2 t3 t4 t5"


# ---- pure -------------------------------------------------------------------------------------------------

def test_per_token_itls_pure():
    assert per_token_itls([(1.0, 1), (1.5, 1), (2.0, 2)]) == ([0.5, 0.25, 0.25], "token_ids")
    assert per_token_itls([(1.0, 3)]) == ([0.0, 0.0], "token_ids")
    itls, basis = per_token_itls([(1.0, 1), (2.0, 1), (3.0, 1)], output_tokens=5)
    assert basis == "chunks" and itls == [0.5, 0.5]
    assert per_token_itls([]) == ([], "token_ids")


def test_finalize_and_stats_edge_cases():
    one = finalize(RequestRecord(0, max_tokens=1, output_tokens=1, e2el=0.2, chunks=[(0.1, 1)]), True, True)
    assert one.ok and one.tpot is None and one.itls == [] and one.tokens_per_s_per_user is None
    empty = finalize(RequestRecord(1, max_tokens=4, output_tokens=0, e2el=0.2), True, False)
    assert empty.status == "incomplete" and empty.error_kind == "no_tokens"
    assert stats([])["count"] == 0 and stats([None, 2.0])["p50"] == 2.0
    s = summarize([empty], 1.0)
    assert s["completed"] == 0 and s["ttft"]["mean"] is None and s["request_throughput"] == 0


def test_line_separators_inside_json_strings_do_not_split_events():
    # U+2028, U+2029 and U+0085 are line breaks to str.splitlines (httpx's aiter_lines) but not to SSE
    script = Script(ttft=0.01, itl=0.001, tokens=3, text="a\u2028b\u2029c\x85d\x1ce")
    run, _ = run_sequential([script], fixed_workload(1, output=3))
    r = run.records[0]
    assert r.ok and r.output_tokens == 3, r.error
