"""Arrival processes: when each request is sent, as offsets in seconds from the start of a run.

- ``constant``: one request every 1/rate seconds.
- ``poisson``: exponential inter-arrival times with mean 1/rate (coefficient of variation 1).
- ``gamma``: gamma inter-arrival times with mean 1/rate and shape ``burstiness`` (vLLM's meaning):
  CV = 1/sqrt(burstiness); 1 is Poisson, below 1 burstier, above 1 more regular.
- ``onoff``: Poisson at ``rate`` during ``on_s``-second bursts separated by ``off_s`` idle seconds
  (mean rate = rate * on_s / (on_s + off_s); peak-to-average = (on_s + off_s) / on_s).
- ``trace``: replay the timestamps of a JSONL file (one number, or an object with ``timestamp``
  (seconds) or ``timestamp_ms``, per line; optional ``input_tokens`` / ``output_tokens`` are used as the
  request's lengths), shifted to start at 0 and divided by ``time_scale``.
A rate of ``inf`` sends everything at t = 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROCESSES = ("constant", "poisson", "gamma", "onoff", "trace")


@dataclass
class TraceEntry:
    t: float
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass
class ArrivalSpec:
    process: str = "poisson"
    rate: float = 1.0              # requests/s (during on periods for onoff)
    burstiness: float = 1.0        # gamma shape
    on_s: float = 10.0             # onoff
    off_s: float = 10.0
    path: str | None = None        # trace
    time_scale: float = 1.0        # trace: > 1 replays faster
    _trace: list[TraceEntry] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.process not in PROCESSES:
            raise ValueError(f"arrival process {self.process!r} unknown; one of {', '.join(PROCESSES)}")
        if not (self.rate > 0):
            raise ValueError(f"arrival rate must be > 0 (inf = all at once), got {self.rate}")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.process == "onoff" and (self.on_s <= 0 or self.off_s < 0):
            raise ValueError("onoff needs on_s > 0 and off_s >= 0")
        if self.process == "trace":
            if not self.path and not self._trace:
                raise ValueError("trace arrivals need a path to a JSONL file of timestamps")
            if self.time_scale <= 0:
                raise ValueError("time_scale must be > 0")
            if not self._trace:
                self._trace = load_trace(self.path)

    @classmethod
    def parse(cls, spec) -> "ArrivalSpec":
        if isinstance(spec, ArrivalSpec):
            return spec
        spec = dict(spec or {})
        if "process" not in spec and "kind" in spec:
            spec["process"] = spec.pop("kind")
        if isinstance(spec.get("rate"), str):
            spec["rate"] = float(spec["rate"])
        unknown = set(spec) - {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        if unknown:
            raise ValueError(f"unknown arrival fields: {sorted(unknown)}")
        return cls(**spec)

    def to_dict(self) -> dict:
        out: dict = {"process": self.process}
        if self.process != "trace":
            out["rate"] = self.rate
        if self.process == "gamma":
            out["burstiness"] = self.burstiness
        if self.process == "onoff":
            out.update(on_s=self.on_s, off_s=self.off_s)
        if self.process == "trace":
            out.update(path=self.path, time_scale=self.time_scale)
        return out

    @property
    def trace(self) -> list[TraceEntry]:
        return self._trace

    def mean_rate(self) -> float:
        """Average requests/s this process offers."""
        if self.process == "onoff":
            return self.rate * self.on_s / (self.on_s + self.off_s)
        if self.process == "trace":
            times = [e.t for e in self._trace]
            span = (max(times) - min(times)) / self.time_scale if len(times) > 1 else 0.0
            return (len(times) - 1) / span if span > 0 else math.inf
        return self.rate

    def peak_to_average(self) -> float:
        if self.process == "onoff":
            return (self.on_s + self.off_s) / self.on_s
        return 1.0

    def with_rate(self, rate: float) -> "ArrivalSpec":
        """The same process shape at a mean rate of `rate` requests/s."""
        if self.process == "onoff":
            return ArrivalSpec("onoff", rate=rate * (self.on_s + self.off_s) / self.on_s, on_s=self.on_s,
                               off_s=self.off_s)
        if self.process == "trace":
            current = self.mean_rate()
            scale = self.time_scale * (rate / current if math.isfinite(current) and current > 0 else 1.0)
            return ArrivalSpec("trace", path=self.path, time_scale=scale, _trace=self._trace)
        return ArrivalSpec(self.process, rate=rate, burstiness=self.burstiness)

    def describe(self) -> str:
        if self.process == "trace":
            return f"trace {self.path} ({len(self._trace)} arrivals, x{self.time_scale:g} speed)"
        rate = "all at once" if math.isinf(self.rate) else f"{self.rate:g} req/s"
        if self.process == "gamma":
            return f"gamma {rate}, burstiness {self.burstiness:g} (CV {1 / math.sqrt(self.burstiness):.2f})"
        if self.process == "onoff":
            return f"on/off: {rate} for {self.on_s:g} s, idle {self.off_s:g} s (mean {self.mean_rate():g} req/s)"
        return f"{self.process} {rate}"

    def offsets(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Send times (seconds from the start, non-decreasing, first at 0) of n requests."""
        if n <= 0:
            return np.zeros(0)
        if self.process == "trace":
            times = np.array([e.t for e in self._trace[:n]], dtype=float)
            if len(times) < n:
                raise ValueError(f"the trace has {len(self._trace)} arrivals; {n} requested")
            return (times - times[0]) / self.time_scale
        if math.isinf(self.rate):
            return np.zeros(n)
        if self.process == "constant":
            return np.arange(n) / self.rate
        if self.process == "poisson":
            gaps = rng.exponential(1.0 / self.rate, size=n)
        elif self.process == "gamma":
            gaps = rng.gamma(self.burstiness, 1.0 / (self.rate * self.burstiness), size=n)
        else:  # onoff: Poisson in "on" time, then map on-time onto wall time by inserting the off gaps
            on_time = np.cumsum(rng.exponential(1.0 / self.rate, size=n))
            on_time -= on_time[0]
            periods = np.floor(on_time / self.on_s)
            return on_time + periods * self.off_s
        gaps[0] = 0.0
        return np.cumsum(gaps)


def load_trace(path: str | Path) -> list[TraceEntry]:
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        item = json.loads(line)
        if isinstance(item, (int, float)):
            entries.append(TraceEntry(float(item)))
            continue
        if "timestamp" in item:
            t = float(item["timestamp"])
        elif "timestamp_ms" in item:
            t = float(item["timestamp_ms"]) / 1000
        else:
            raise ValueError(f"{path}:{number}: a trace line needs timestamp (s) or timestamp_ms")
        entries.append(TraceEntry(t, item.get("input_tokens"), item.get("output_tokens")))
    if not entries:
        raise ValueError(f"{path}: empty trace")
    entries.sort(key=lambda e: e.t)
    return entries
