"""Capacity plan and token-timing view of `tokenmill bench`."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.bench.cli import main
from tokenmill.bench.plan import capacity_plan
from tokenmill.bench.token_timing import ITLModel, simulate


def test_capacity_plan_exact():
    plan = capacity_plan(2.5, 10, 3, gpu_dollars_per_hour=2.0, gpus_per_replica=2, input_tokens_per_request=1000,
                         output_tokens_per_request=250)
    assert plan.peak_qps == 30 and plan.replicas == 12                 # ceil(30 / 2.5)
    assert plan.utilization_at_peak == pytest.approx(1.0) and plan.utilization_at_average == pytest.approx(1 / 3)
    assert plan.dollars_per_hour == 48.0 and plan.dollars_per_month == 48.0 * 720
    # 10 req/s x 250 tokens = 9 Mtok/hour of output for $48/hour
    assert plan.dollars_per_output_mtok == pytest.approx(48 / 9) and plan.output_mtok_per_dollar == pytest.approx(9 / 48)
    assert plan.dollars_per_total_mtok == pytest.approx(48 / 45)
    headroom = capacity_plan(2.5, 10, 3, max_utilization=0.8, spare_replicas=1)
    assert headroom.replicas == 15 + 1                                 # ceil(30 / 2) + 1 spare
    assert capacity_plan(4, 12).replicas == 3 and capacity_plan(4, 12.1).replicas == 4
    with pytest.raises(ValueError, match="per-replica rate"):
        capacity_plan(0, 10)


def test_plan_cli(capsys):
    assert main(["plan", "--replica-rate", "2.5", "--target-qps", "10", "--peak-to-average", "3",
                 "--output-tokens", "250", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"replicas": 12' in out
    assert main(["plan", "--target-qps", "10"]) == 2


def test_token_timing_parametric_stalls():
    # 5% of tokens stall 200 ms: a 1,000-token answer meets ~50 of them, so almost every answer stutters
    model = ITLModel(median_s=0.01, p99_s=0.02, stall_fraction=0.05, stall_s=0.2)
    t = simulate(model, tokens=1000, threshold_s=0.1, completions=500)
    assert t.mean_stalls == pytest.approx(0.05 * 999, rel=0.05)
    assert t.p_any_stall == 1.0 and t.longest_stall_p50_s == pytest.approx(0.2)
    assert t.p_token_stall == pytest.approx(0.05, abs=0.003)
    assert t.itl_p50_s < 0.012 and t.itl_p99_s == pytest.approx(0.2)
    assert any("the median" in line for line in t.lines())


def test_token_timing_lognormal_matches_its_percentiles():
    t = simulate(ITLModel(median_s=0.02, p99_s=0.08), tokens=1000, threshold_s=0.2, completions=400)
    assert t.itl_p50_s == pytest.approx(0.02, rel=0.03) and t.itl_p99_s == pytest.approx(0.08, rel=0.05)
    assert t.slow_tokens_at_p95 == pytest.approx(0.05 * 999, rel=0.02)   # 1 in 20 is ~50 per answer
    assert t.decode_time_p50_s == pytest.approx(999 * 0.02 * np.exp(np.log(4) ** 2 / 2 / 2.326 ** 2), rel=0.03)


def test_token_timing_from_samples_and_rare_stalls():
    samples = np.array([0.01] * 99 + [0.5])       # the p99 is a half-second stall
    t = simulate(ITLModel(samples=samples), tokens=1000, completions=1000)
    assert t.threshold_s == pytest.approx(0.1)    # 3x the median, at least 100 ms
    assert t.mean_stalls == pytest.approx(9.99, rel=0.1)
    assert t.p_any_stall > 0.99                   # "rare" per token, constant per answer
    with pytest.raises(ValueError):
        ITLModel(samples=np.array([]))


def test_timing_cli(capsys, tmp_path):
    assert main(["bench", "timing", "--itl-median-ms", "20", "--itl-p99-ms", "150", "--tokens", "500",
                 "--completions", "200", "--plot", str(tmp_path / "t.png")]) == 0
    assert "stalls over" in capsys.readouterr().out
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
