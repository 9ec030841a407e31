"""Benchmark modes against the scripted server (real time, short scripts)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from tokenmill.bench.client import Target
from tokenmill.bench.metrics import RequestRecord
from tokenmill.bench.runner import Bench, best_slo_run, saturation_check
from tokenmill.bench.workload import SLO, ArrivalSpec, LengthDist, PrefixSpec, Workload
from tokenmill.testing.scripted_server import Script, ScriptedServer

FAST = Script(ttft=0.01, itl=0.002, tokens=4)


def workload(n=8, **kw) -> Workload:
    return Workload(name="t", num_requests=n, input_tokens=LengthDist("fixed", value=6),
                    output_tokens=LengthDist("fixed", value=4), **kw)


def bench(server, w, fn, **kw):
    async def go():
        async with Bench(Target(server.url), w, **kw) as b:
            return await fn(b)
    return asyncio.run(go())


def test_sequential_burst_concurrency_and_rate_modes():
    with ScriptedServer(FAST) as server:
        seq = bench(server, workload(), lambda b: b.sequential())
        assert seq.summary["completed"] == 8 and seq.summary["max_concurrency_observed"] == 1
        burst = bench(server, workload(12), lambda b: b.burst(cap=3))
        assert burst.summary["completed"] == 12 and burst.summary["max_concurrency_observed"] <= 3
        assert burst.offered_rate == math.inf
        conc = bench(server, workload(10), lambda b: b.concurrency(2))
        assert conc.summary["completed"] == 10 and conc.summary["max_concurrency_observed"] == 2
        rate = bench(server, workload(20, arrival=ArrivalSpec("constant", rate=1.0)), lambda b: b.rate(100.0))
        assert rate.offered_rate == 100.0 and rate.summary["completed"] == 20
        assert [r.scheduled_s for r in rate.records] == pytest.approx([i / 100 for i in range(20)])
        lags = [abs(r.send_s - r.scheduled_s) for r in rate.records]   # on schedule (a loaded CI box may hiccup)
        assert float(np.median(lags)) < 0.03 and max(lags) < 0.25
        assert not rate.saturated
        assert len(server.requests) == 8 + 12 + 10 + 20
        warm = bench(server, workload(2), lambda b: b.sequential(), warmup=3)
        assert warm.summary["requests"] == 2 and len(server.requests) == 50 + 3 + 2   # warm-up not measured


def test_chat_multi_turn_sends_history_and_system_prompt():
    w = workload(6, api="chat", prefix=PrefixSpec(shared_tokens=5, turns=LengthDist("fixed", value=2)))
    with ScriptedServer(FAST) as server:
        run = bench(server, w, lambda b: b.sequential(), warmup=0)
        bodies = server.requests
    assert run.summary["completed"] == 6 and run.source["conversations"] == 3
    assert bodies[0]["messages"][0]["role"] == "system" and len(bodies[0]["messages"]) == 2
    assert [m["role"] for m in bodies[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert bodies[1]["messages"][2]["content"] == " t0 t1 t2 t3"          # the reply, resent
    assert bodies[1]["messages"][1] == bodies[0]["messages"][1]
    assert all(len(m["content"].split()) == 6 for b in bodies for m in b["messages"] if m["role"] == "user")


def test_sweep_stops_once_errors_exceed_the_limit():
    # the server breaks after its first 19 requests (4 sequential + 15 burst)
    def script(body, number):
        return FAST if number < 19 else Script(fail="http_503")
    w = workload(15, slo=SLO(ttft_ms=1000))
    with ScriptedServer(script) as server:
        runs, info = bench(server, w, lambda b: b.sweep(num_rates=3, sequential_n=4))
    assert [r.mode for r in runs] == ["sequential", "burst", "rate"]
    assert runs[2].summary["failure_kinds"] == {"http_503": 15}
    assert "error rate 100.0%" in info["stop_reason"] and len(info["skipped_rates"]) == 2
    assert info["min_rate"] < info["rates"][0] < info["max_rate"]
    assert info["max_slo_run"] == "sequential"   # burst is not a sustained load; the rate run failed


def record(i, send, ttft, ok=True):
    return RequestRecord(i, send_s=send, end_s=send + ttft + 0.1, ttft=ttft, status="ok" if ok else "error")


def test_saturation_check():
    stable = [record(i, i * 0.1, 0.05 + 0.01 * (i % 3)) for i in range(40)]
    assert not saturation_check(stable)["saturated"]
    growing = [record(i, i * 0.1, 0.05 + 0.09 * i) for i in range(40)]   # the queue grows with every arrival
    result = saturation_check(growing)
    assert result["saturated"] and result["ttft_last_quarter_s"] > 2 * result["ttft_first_quarter_s"]
    assert not saturation_check(growing[:5])["saturated"]


def test_best_slo_run_prefers_the_highest_sustained_rate():
    from tokenmill.bench.runner import RunResult

    def run(name, mode, rate, met, throughput):
        return RunResult(name, mode, [], {"slo": {"met": met}, "request_throughput": throughput}, rate)
    runs = [run("sequential", "sequential", None, True, 1.0), run("burst", "burst", math.inf, True, 9.0),
            run("rate 3/s", "rate", 3.0, True, 2.8), run("rate 5/s", "rate", 5.0, False, 4.1),
            run("rate 4/s", "rate", 4.0, True, 3.7)]
    info = best_slo_run(runs)
    assert info["max_slo_rate"] == 4.0 and info["max_slo_run"] == "rate 4/s" and info["slo_note"] is None
    assert best_slo_run(runs[:3])["slo_note"]


def test_duration_limit_and_unreachable_target():
    with ScriptedServer(Script(ttft=0.05, itl=0.01, tokens=4)) as server:
        run = bench(server, workload(1000, arrival=ArrivalSpec("constant", rate=50)),
                    lambda b: b.rate(), duration=0.3, warmup=0)
    assert 5 <= run.summary["requests"] <= 25 and run.summary["completed"] == run.summary["requests"]
    import httpx

    class Nowhere:
        url = "http://127.0.0.1:9"
    with pytest.raises(httpx.HTTPError):
        bench(Nowhere, workload(), lambda b: b.sequential())


def test_open_loop_arrivals_follow_the_process():
    w = workload(200, arrival=ArrivalSpec("poisson", rate=400.0))
    with ScriptedServer(Script(ttft=0.001, itl=0.001, tokens=4)) as server:
        run = bench(server, w, lambda b: b.rate(), warmup=0)
    gaps = np.diff([r.scheduled_s for r in run.records])
    assert 1 / gaps.mean() == pytest.approx(400, rel=0.25)
    assert run.summary["completed"] == 200


def test_best_slo_run_is_the_last_before_the_first_miss():
    from tokenmill.bench.runner import RunResult

    def run(name, rate, met):
        return RunResult(name, "rate", [], {"slo": {"met": met}, "request_throughput": rate}, rate)
    noisy = best_slo_run([run("a", 1.0, True), run("b", 2.0, False), run("c", 3.0, True)])
    assert noisy["max_slo_rate"] == 1.0 and noisy["max_slo_rate_any"] == 3.0 and "noisy" in noisy["slo_note"]
    none = best_slo_run([run("a", 1.0, False), run("b", 2.0, True)])
    assert none["max_slo_run"] is None and "noisy" in none["slo_note"]


def test_sweep_refines_the_slo_rate_by_bisection():
    """--refine: after the evenly spaced rates, bisect between the last rate that met the SLOs and the
    first that missed (here the replica holds up to 3.3 req/s)."""
    import asyncio

    from tokenmill.bench.client import Target
    from tokenmill.bench.runner import Bench, RunResult

    def result(name, mode, rate, throughput):
        met = mode == "burst" or throughput <= 3.3
        return RunResult(name, mode, [], {"slo": {"met": met}, "request_throughput": throughput,
                                          "error_rate": 0.0}, rate)

    bench = Bench(Target("http://unused"), workload(10))

    async def sequential(n=None):
        return result("sequential", "sequential", None, 1.0)

    async def burst(n=None, cap=None):
        return result("burst", "burst", math.inf, 9.0)

    async def rate(r, n=None):
        return result(f"rate {r:.3g}/s", "rate", r, r)

    bench.sequential, bench.burst, bench.rate = sequential, burst, rate
    runs, info = asyncio.run(bench.sweep(num_rates=3, refine=4))
    assert info["rates"] == [3.0, 5.0, 7.0]
    assert info["refined_rates"] == [4.0, 3.5, 3.25, 3.375]
    assert info["max_slo_rate"] == 3.25 and len(runs) == 2 + 3 + 4
    # converged (within 2%) or nothing to refine: no extra runs
    _, info = asyncio.run(bench.sweep(num_rates=3, refine=0))
    assert info["refined_rates"] == []


def test_ctrl_c_saves_the_runs_that_finished(tmp_path):
    """SIGINT during the sweep's first rate run: the sequential and burst runs are written (JSON marked
    interrupted, CSVs) and the command exits 130."""
    import json
    import signal
    import subprocess
    import sys
    import time

    def script(body, number):   # warm-up 1 + sequential 3 + burst 6 answer; the rate run then hangs
        return FAST if number < 10 else Script(fail="hang")
    with ScriptedServer(script) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", "bench", "sweep", "--base-url", server.url, "--num-prompts", "6",
             "--sequential-prompts", "3", "--num-rates", "2", "--workload", "agent", "--length-scale", "0.02",
             "--output-len", "4", "--return-token-ids", "on", "--no-plots", "--no-progress",
             "--result-dir", str(tmp_path), "--result-filename", "cut"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(server.requests) < 11 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    data = json.loads((tmp_path / "cut.json").read_text())
    assert data["settings"]["interrupted"] and [r["name"] for r in data["runs"]] == ["sequential", "burst"]
    assert data["sweep"]["stop_reason"] == "interrupted" and (tmp_path / "cut-runs.csv").exists()
    assert "interrupted: saving the 2 run(s)" in err
