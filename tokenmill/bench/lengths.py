"""Token-length distributions: fixed, uniform, normal, lognormal, empirical.

Every distribution draws integers >= 1, clipped to [min, max] when given. Written in a workload as a
mapping, e.g. ``{dist: lognormal, median: 250, sigma: 0.6, min: 16, max: 1024}``; a bare integer means
``{dist: fixed, value: N}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("fixed", "uniform", "normal", "lognormal", "empirical")


@dataclass
class LengthDist:
    dist: str = "fixed"
    value: int | None = None            # fixed
    min: int | None = None              # uniform bounds; clip bounds for the others
    max: int | None = None
    mean: float | None = None           # normal; lognormal (alternative to median)
    std: float | None = None            # normal
    median: float | None = None         # lognormal
    sigma: float | None = None          # lognormal: std of log(length)
    values: list[int] = field(default_factory=list)    # empirical samples (drawn uniformly) ...
    weights: list[float] | None = None                  # ... or with these weights
    path: str | None = None             # empirical: a file of lengths (one per line, or JSON list / JSONL)

    def __post_init__(self):
        if self.dist not in KINDS:
            raise ValueError(f"length distribution {self.dist!r} unknown; one of {', '.join(KINDS)}")
        need = {"fixed": ("value",), "uniform": ("min", "max"), "normal": ("mean", "std"),
                "lognormal": ("sigma",)}.get(self.dist, ())
        missing = [name for name in need if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.dist} length distribution needs {', '.join(missing)}")
        if self.dist == "lognormal" and (self.median is None) == (self.mean is None):
            raise ValueError("lognormal length distribution needs exactly one of median or mean")
        if self.dist == "empirical":
            if self.path and not self.values:
                self.values = load_lengths(self.path)
            if not self.values:
                raise ValueError("empirical length distribution needs values or path")
            if self.weights is not None and len(self.weights) != len(self.values):
                raise ValueError("empirical weights must be as many as values")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"length min {self.min} > max {self.max}")

    @classmethod
    def parse(cls, spec) -> "LengthDist":
        if isinstance(spec, LengthDist):
            return spec
        if isinstance(spec, (int, float)):
            return cls("fixed", value=int(spec))
        if not isinstance(spec, dict):
            raise ValueError(f"a length distribution is an integer or a mapping, not {spec!r}")
        spec = dict(spec)
        kind = spec.pop("dist", spec.pop("kind", "fixed"))
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown length distribution fields: {sorted(unknown)}")
        return cls(kind, **spec)

    def to_dict(self) -> dict:
        out = {"dist": self.dist}
        for name in ("value", "min", "max", "mean", "std", "median", "sigma", "weights", "path"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.dist == "empirical" and not self.path:
            out["values"] = list(self.values)
        return out

    def scaled(self, factor: float) -> "LengthDist":
        """The same shape with lengths multiplied by factor (for small models' context limits)."""
        if factor == 1.0:
            return self

        def s(x):
            return None if x is None else max(1, int(round(x * factor)))

        return LengthDist(self.dist, value=s(self.value), min=s(self.min), max=s(self.max),
                          mean=None if self.mean is None else self.mean * factor,
                          std=None if self.std is None else self.std * factor,
                          median=None if self.median is None else self.median * factor, sigma=self.sigma,
                          values=[max(1, int(round(v * factor))) for v in self.values], weights=self.weights)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.dist == "fixed":
            raw = np.full(n, float(self.value))
        elif self.dist == "uniform":
            raw = rng.integers(int(self.min), int(self.max) + 1, size=n).astype(float)
        elif self.dist == "normal":
            raw = rng.normal(self.mean, self.std, size=n)
        elif self.dist == "lognormal":
            mu = math.log(self.median) if self.median is not None else math.log(self.mean) - self.sigma ** 2 / 2
            raw = rng.lognormal(mu, self.sigma, size=n)
        else:
            p = None
            if self.weights is not None:
                w = np.asarray(self.weights, dtype=float)
                p = w / w.sum()
            raw = rng.choice(np.asarray(self.values, dtype=float), size=n, p=p)
        out = np.rint(raw)
        lo = 1 if self.min is None else max(1, self.min)
        hi = np.inf if self.max is None else self.max
        return np.clip(out, lo, hi).astype(int)

    def expected(self) -> float:
        """The mean before rounding and clipping (for plans and descriptions)."""
        if self.dist == "fixed":
            return float(self.value)
        if self.dist == "uniform":
            return (self.min + self.max) / 2
        if self.dist == "normal":
            return float(self.mean)
        if self.dist == "lognormal":
            if self.mean is not None:
                return float(self.mean)
            return self.median * math.exp(self.sigma ** 2 / 2)
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=float)
            return float(np.dot(w / w.sum(), self.values))
        return float(np.mean(self.values))

    def describe(self) -> str:
        clip = ""
        if (self.min is not None or self.max is not None) and self.dist not in ("fixed", "uniform"):
            clip = f" in [{self.min or 1}, {self.max if self.max is not None else 'inf'}]"
        if self.dist == "fixed":
            return f"{self.value}"
        if self.dist == "uniform":
            return f"uniform {self.min}-{self.max}"
        if self.dist == "normal":
            return f"normal mean {self.mean:g} std {self.std:g}{clip}"
        if self.dist == "lognormal":
            centre = f"median {self.median:g}" if self.median is not None else f"mean {self.mean:g}"
            return f"lognormal {centre} sigma {self.sigma:g}{clip}"
        return f"empirical ({len(self.values)} values, mean {self.expected():.0f}){clip}"


def load_lengths(path: str | Path) -> list[int]:
    """Lengths from a file: a JSON list, JSONL (numbers or objects with a length field), or one per line."""
    text = Path(path).read_text()
    stripped = text.strip()
    if stripped.startswith("["):
        return [int(v) for v in json.loads(stripped)]
    values = []
    for line in stripped.splitlines():
        line = line.strip()
        if not line:
            continue
        item = json.loads(line) if line[0] in "{[" else float(line)
        if isinstance(item, dict):
            for key in ("length", "tokens", "output_tokens", "input_tokens"):
                if key in item:
                    item = item[key]
                    break
            else:
                raise ValueError(f"{path}: no length field in {line[:80]}")
        values.append(int(item))
    return values
