"""Workloads: what a benchmark sends. Loaded from YAML/JSON or taken from the seed's archetypes.

A workload is the hand-off the seed asks for between the application and the inference engineer:
arrival process (queries per second and their burstiness), tokens per query (input and output length
distributions), prefix reuse (shared-prefix groups, multi-turn conversations), latency budget (SLOs at
a percentile) and the price of a GPU hour.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from tokenmill.bench.arrivals import ArrivalSpec
from tokenmill.bench.lengths import LengthDist

APIS = ("completions", "chat")
PROMPT_SOURCES = ("ids", "text")


@dataclass
class PrefixSpec:
    """Prefix reuse. ``shared_tokens``: length of each group's shared prefix (system prompt, tool
    definitions); ``groups``: how many distinct shared prefixes (each conversation picks one uniformly);
    ``turns``: turns per conversation (each turn resends the whole conversation so far: prefix, earlier
    inputs and the model's earlier outputs, then a new input)."""
    shared_tokens: int = 0
    groups: int = 1
    turns: LengthDist = field(default_factory=lambda: LengthDist("fixed", value=1))

    @classmethod
    def parse(cls, spec) -> "PrefixSpec":
        spec = dict(spec or {})
        unknown = set(spec) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown prefix fields: {sorted(unknown)}")
        if "turns" in spec:
            spec["turns"] = LengthDist.parse(spec["turns"])
        out = cls(**spec)
        if out.shared_tokens < 0 or out.groups < 1:
            raise ValueError("prefix.shared_tokens must be >= 0 and prefix.groups >= 1")
        return out

    def to_dict(self) -> dict:
        return {"shared_tokens": self.shared_tokens, "groups": self.groups, "turns": self.turns.to_dict()}

    @property
    def multi_turn(self) -> bool:
        return not (self.turns.dist == "fixed" and self.turns.value == 1)


SLO_METRICS = ("ttft", "tpot", "itl", "ttlt", "e2el")


@dataclass
class SLO:
    """Latency budget: each given limit (milliseconds) must hold at ``percentile`` over the successful
    requests of a run (ITL over all their tokens), and at most ``max_error_rate`` of requests may fail.
    Goodput counts the requests that meet every limit individually (vLLM's ``--goodput``)."""
    percentile: float = 90.0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None
    ttlt_ms: float | None = None       # time to last token
    e2el_ms: float | None = None       # end-to-end latency (until the stream's end)
    max_error_rate: float = 0.01

    @classmethod
    def parse(cls, spec) -> "SLO":
        spec = dict(spec or {})
        unknown = set(spec) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown slo fields: {sorted(unknown)}")
        out = cls(**spec)
        if not 0 < out.percentile <= 100:
            raise ValueError("slo.percentile must be in (0, 100]")
        return out

    def limits(self) -> dict[str, float]:
        """metric -> limit in seconds, for the limits that are set."""
        return {m: getattr(self, f"{m}_ms") / 1000 for m in SLO_METRICS if getattr(self, f"{m}_ms") is not None}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        parts = [f"{m.upper()} <= {getattr(self, f'{m}_ms'):g} ms" for m in SLO_METRICS
                 if getattr(self, f"{m}_ms") is not None]
        if not parts:
            return "none"
        return f"p{self.percentile:g} " + ", ".join(parts) + f"; errors <= {self.max_error_rate:.1%}"


@dataclass
class Cost:
    gpu_dollars_per_hour: float = 2.5
    gpus_per_replica: int = 1

    @property
    def replica_dollars_per_hour(self) -> float:
        return self.gpu_dollars_per_hour * self.gpus_per_replica


@dataclass
class Workload:
    name: str = "custom"
    description: str = ""
    api: str = "completions"               # completions | chat
    prompt_source: str = "ids"             # ids (completions only) | text
    num_requests: int = 100
    arrival: ArrivalSpec = field(default_factory=ArrivalSpec)
    input_tokens: LengthDist = field(default_factory=lambda: LengthDist("fixed", value=256))
    output_tokens: LengthDist = field(default_factory=lambda: LengthDist("fixed", value=128))
    prefix: PrefixSpec = field(default_factory=PrefixSpec)
    slo: SLO = field(default_factory=SLO)
    cost: Cost = field(default_factory=Cost)
    temperature: float = 0.0
    ignore_eos: bool = True                # outputs of exactly the drawn length (a shorter stream is incomplete)
    figure_of_merit: list[str] = field(default_factory=list)
    peak_to_average: float | None = None   # for the capacity plan (default: the arrival process's)
    target_qps: float | None = None        # for the capacity plan

    def __post_init__(self):
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.prompt_source not in PROMPT_SOURCES:
            raise ValueError(f"prompt_source must be one of {PROMPT_SOURCES}, got {self.prompt_source!r}")
        if self.api == "chat" and self.prompt_source == "ids":
            self.prompt_source = "text"   # chat messages are text
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        data = dict(data)
        base = data.pop("archetype", None)
        out = archetype(base) if base else cls()
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"sampling"}
        if unknown:
            raise ValueError(f"unknown workload fields: {sorted(unknown)}")
        sampling = data.pop("sampling", {}) or {}
        for key in ("temperature", "ignore_eos"):
            if key in sampling:
                data[key] = sampling[key]
        parsers = {"arrival": ArrivalSpec.parse, "input_tokens": LengthDist.parse, "output_tokens": LengthDist.parse,
                   "prefix": PrefixSpec.parse, "slo": SLO.parse,
                   "cost": lambda d: Cost(**d) if isinstance(d, dict) else d}
        for key, value in data.items():
            if key in parsers and value is not None:
                value = parsers[key](value)
            setattr(out, key, value)
        if "api" in data and "prompt_source" not in data:
            out.prompt_source = "text" if out.api == "chat" else "ids"
        out.__post_init__()
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "api": self.api,
                "prompt_source": self.prompt_source, "num_requests": self.num_requests,
                "arrival": self.arrival.to_dict(), "input_tokens": self.input_tokens.to_dict(),
                "output_tokens": self.output_tokens.to_dict(), "prefix": self.prefix.to_dict(),
                "slo": self.slo.to_dict(),
                "cost": {"gpu_dollars_per_hour": self.cost.gpu_dollars_per_hour,
                         "gpus_per_replica": self.cost.gpus_per_replica},
                "sampling": {"temperature": self.temperature, "ignore_eos": self.ignore_eos},
                "figure_of_merit": list(self.figure_of_merit), "peak_to_average": self.peak_to_average,
                "target_qps": self.target_qps}

    def scaled(self, factor: float) -> "Workload":
        """Token lengths (inputs, outputs, shared prefix) multiplied by factor."""
        out = copy.deepcopy(self)
        if factor != 1.0:
            out.input_tokens = self.input_tokens.scaled(factor)
            out.output_tokens = self.output_tokens.scaled(factor)
            out.prefix.shared_tokens = int(round(self.prefix.shared_tokens * factor))
        return out

    def plan_peak_to_average(self) -> float:
        return self.peak_to_average if self.peak_to_average is not None else self.arrival.peak_to_average()

    def describe(self) -> list[tuple[str, str]]:
        prefix = "none"
        if self.prefix.shared_tokens:
            prefix = f"{self.prefix.groups} group(s) x {self.prefix.shared_tokens} shared tokens"
        if self.prefix.multi_turn:
            prefix += f"; turns per conversation {self.prefix.turns.describe()}"
        return [("workload", f"{self.name}: {self.description}" if self.description else self.name),
                ("api", f"{self.api} ({'token-id' if self.prompt_source == 'ids' else 'text'} prompts)"),
                ("arrivals", self.arrival.describe()),
                ("input tokens", self.input_tokens.describe()),
                ("output tokens", self.output_tokens.describe() + (" (ignore_eos)" if self.ignore_eos else "")),
                ("prefix reuse", prefix),
                ("SLO", self.slo.describe()),
                ("cost", f"${self.cost.gpu_dollars_per_hour:g}/GPU-hour x {self.cost.gpus_per_replica} GPU(s)"),
                ("figure of merit", ", ".join(self.figure_of_merit) or "-")]


# ---- the seed's three archetypes -------------------------------------------------------------------------

ARCHETYPES: dict[str, dict] = {
    "chatbot": {
        "description": "streaming multi-turn conversations sharing a system prompt; a person reads as tokens arrive",
        "api": "chat", "prompt_source": "text", "num_requests": 200,
        "arrival": {"process": "poisson", "rate": 2.0},
        "input_tokens": {"dist": "lognormal", "median": 120, "sigma": 0.8, "min": 8, "max": 2048},
        "output_tokens": {"dist": "lognormal", "median": 250, "sigma": 0.6, "min": 16, "max": 1024},
        "prefix": {"shared_tokens": 1024, "groups": 1, "turns": {"dist": "uniform", "min": 2, "max": 6}},
        "slo": {"percentile": 90, "ttft_ms": 1000, "tpot_ms": 50, "max_error_rate": 0.01},
        "figure_of_merit": ["tokens_per_s_per_user", "ttft"],
        "peak_to_average": 3.0,
    },
    "agent": {
        "description": "long shared prefixes (tool definitions), context growing across turns, long outputs",
        "api": "completions", "prompt_source": "ids", "num_requests": 100,
        "arrival": {"process": "poisson", "rate": 0.5},
        "input_tokens": {"dist": "lognormal", "median": 400, "sigma": 0.7, "min": 32, "max": 4096},
        "output_tokens": {"dist": "lognormal", "median": 600, "sigma": 0.5, "min": 64, "max": 2048},
        "prefix": {"shared_tokens": 3000, "groups": 2, "turns": {"dist": "uniform", "min": 3, "max": 8}},
        "slo": {"percentile": 90, "ttlt_ms": 60000, "max_error_rate": 0.01},
        "figure_of_merit": ["ttlt"],
        "peak_to_average": 2.0,
    },
    "data-processor": {
        "description": "bursts of documents (long inputs, short structured outputs) separated by idle gaps",
        "api": "completions", "prompt_source": "ids", "num_requests": 200,
        "arrival": {"process": "onoff", "rate": 8.0, "on_s": 30, "off_s": 90},
        "input_tokens": {"dist": "lognormal", "median": 3000, "sigma": 0.5, "min": 256, "max": 16000},
        "output_tokens": {"dist": "normal", "mean": 150, "std": 40, "min": 32, "max": 512},
        "prefix": {"shared_tokens": 256, "groups": 1},
        "slo": {"percentile": 99, "ttlt_ms": 300000, "max_error_rate": 0.001},
        "figure_of_merit": ["mtok_per_dollar"],
    },
}


def archetype(name: str) -> Workload:
    if name not in ARCHETYPES:
        raise ValueError(f"unknown workload archetype {name!r}; one of {', '.join(ARCHETYPES)}")
    return _from_spec(name, copy.deepcopy(ARCHETYPES[name]))


def _from_spec(name: str, spec: dict) -> Workload:
    return Workload(name=name, description=spec["description"], api=spec["api"], prompt_source=spec["prompt_source"],
                    num_requests=spec["num_requests"], arrival=ArrivalSpec.parse(spec["arrival"]),
                    input_tokens=LengthDist.parse(spec["input_tokens"]),
                    output_tokens=LengthDist.parse(spec["output_tokens"]), prefix=PrefixSpec.parse(spec["prefix"]),
                    slo=SLO.parse(spec["slo"]), figure_of_merit=list(spec["figure_of_merit"]),
                    peak_to_average=spec.get("peak_to_average"))


def load_workload(spec: str) -> Workload:
    """An archetype name, or a YAML/JSON file (which may start from an archetype: ``archetype: chatbot``)."""
    if spec in ARCHETYPES:
        return archetype(spec)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"workload {spec!r} is neither an archetype ({', '.join(ARCHETYPES)}) nor a file")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a workload file holds a mapping")
    data.setdefault("name", path.stem)
    return Workload.from_dict(data)


def dump_workload(workload: Workload) -> str:
    import yaml

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, float) and math.isinf(obj):
            return ".inf"
        return obj

    return yaml.safe_dump(clean(workload.to_dict()), sort_keys=False)
