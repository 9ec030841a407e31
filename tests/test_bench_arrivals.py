"""Arrival processes and length distributions of `tokenmill bench`, checked statistically."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tokenmill.bench.arrivals import ArrivalSpec
from tokenmill.bench.lengths import LengthDist

N = 40_000


def gaps_of(spec: ArrivalSpec, n: int = N, seed: int = 0) -> np.ndarray:
    offsets = spec.offsets(n, np.random.default_rng(seed))
    assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0)
    return np.diff(offsets)


def cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def test_poisson_rate_and_inter_arrival_cv():
    gaps = gaps_of(ArrivalSpec("poisson", rate=5.0))
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.02)
    assert cv(gaps) == pytest.approx(1.0, abs=0.03)
    # counts in 1-second windows: Poisson, so variance = mean (index of dispersion 1)
    offsets = np.cumsum(np.concatenate([[0], gaps]))
    counts = np.bincount(offsets.astype(int))[:-1]
    assert counts.mean() == pytest.approx(5.0, rel=0.03)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_burstiness_sets_the_cv_not_the_rate(burstiness):
    gaps = gaps_of(ArrivalSpec("gamma", rate=10.0, burstiness=burstiness))
    assert 1 / gaps.mean() == pytest.approx(10.0, rel=0.03)
    assert cv(gaps) == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_bursty_arrivals_cluster():
    # burstier arrivals put more requests in the busiest windows than Poisson at the same rate
    def busiest(spec):
        offsets = spec.offsets(N, np.random.default_rng(1))
        return np.percentile(np.bincount(offsets.astype(int)), 99)
    assert busiest(ArrivalSpec("gamma", rate=5, burstiness=0.2)) > 1.5 * busiest(ArrivalSpec("poisson", rate=5))


def test_constant_and_infinite_rates():
    assert np.allclose(ArrivalSpec("constant", rate=4).offsets(5, np.random.default_rng(0)), [0, .25, .5, .75, 1])
    assert not ArrivalSpec("poisson", rate=math.inf).offsets(7, np.random.default_rng(0)).any()


def test_on_off_bursts():
    spec = ArrivalSpec("onoff", rate=20.0, on_s=2.0, off_s=6.0)
    offsets = spec.offsets(N, np.random.default_rng(0))
    phase = offsets % 8.0
    assert np.all(phase < 2.0 + 1e-9)                                # nothing in the idle gaps
    periods = offsets // 8.0
    per_burst = np.bincount(periods.astype(int))[:-1]
    assert per_burst.mean() / 2.0 == pytest.approx(20.0, rel=0.03)   # the rate while on
    assert spec.mean_rate() == pytest.approx(5.0) and spec.peak_to_average() == pytest.approx(4.0)
    assert N / offsets[-1] == pytest.approx(5.0, rel=0.03)
    scaled = spec.with_rate(2.5)
    assert scaled.mean_rate() == pytest.approx(2.5) and (scaled.on_s, scaled.off_s) == (2.0, 6.0)


def test_trace_replay(tmp_path):
    path = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 100.0, "input_tokens": 30, "output_tokens": 4}, {"timestamp": 100.5},
             {"timestamp_ms": 101_500}, 103.0]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    spec = ArrivalSpec.parse({"process": "trace", "path": str(path)})
    assert list(spec.offsets(4, None)) == [0.0, 0.5, 1.5, 3.0]
    assert spec.trace[0].input_tokens == 30 and spec.trace[0].output_tokens == 4
    assert spec.mean_rate() == pytest.approx(1.0)
    faster = spec.with_rate(2.0)
    assert list(faster.offsets(4, None)) == [0.0, 0.25, 0.75, 1.5]
    with pytest.raises(ValueError, match="trace has 4"):
        spec.offsets(5, None)


def test_arrival_validation():
    with pytest.raises(ValueError, match="unknown"):
        ArrivalSpec("zipf")
    with pytest.raises(ValueError, match="rate"):
        ArrivalSpec("poisson", rate=0)
    with pytest.raises(ValueError, match="unknown arrival fields"):
        ArrivalSpec.parse({"process": "poisson", "speed": 3})


# ---- lengths ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, mean, lo, hi", [
    ({"dist": "fixed", "value": 7}, 7, 7, 7),
    ({"dist": "uniform", "min": 10, "max": 20}, 15, 10, 20),
    ({"dist": "normal", "mean": 200, "std": 20}, 200, 1, None),
    ({"dist": "lognormal", "median": 100, "sigma": 0.5}, 100 * math.exp(0.125), 1, None),
    ({"dist": "lognormal", "mean": 300, "sigma": 0.8}, 300, 1, None),
    ({"dist": "empirical", "values": [10, 30], "weights": [3, 1]}, 15, 10, 30),
])
def test_length_distributions(spec, mean, lo, hi):
    dist = LengthDist.parse(spec)
    x = dist.sample(np.random.default_rng(0), N)
    assert x.dtype.kind == "i" and x.min() >= lo and (hi is None or x.max() <= hi)
    assert x.mean() == pytest.approx(mean, rel=0.02) and dist.expected() == pytest.approx(mean, rel=1e-9)


def test_length_clipping_scaling_and_files(tmp_path):
    clipped = LengthDist.parse({"dist": "normal", "mean": 50, "std": 100, "min": 10, "max": 60})
    x = clipped.sample(np.random.default_rng(0), 1000)
    assert x.min() == 10 and x.max() == 60
    assert LengthDist.parse(12).sample(np.random.default_rng(0), 3).tolist() == [12, 12, 12]
    assert LengthDist.parse({"dist": "uniform", "min": 100, "max": 200}).scaled(0.1).to_dict() == \
        {"dist": "uniform", "min": 10, "max": 20}
    path = tmp_path / "lengths.jsonl"
    path.write_text('{"output_tokens": 5}\n{"output_tokens": 9}\n')
    assert LengthDist.parse({"dist": "empirical", "path": str(path)}).values == [5, 9]
    with pytest.raises(ValueError, match="needs"):
        LengthDist.parse({"dist": "normal", "mean": 3})
