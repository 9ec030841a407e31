"""Benchmark outputs: console summary, JSON (summary + every request), CSV, PNG plots and one
self-contained HTML report (plots embedded as base64 PNG)."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path

from tokenmill import __version__
from tokenmill.bench.metrics import DEFINITIONS, LATENCIES
from tokenmill.bench.plan import CapacityPlan, format_plan
from tokenmill.bench.runner import BenchResult, RunResult

MS = 1e3


# ---- JSON ---------------------------------------------------------------------------------------------------

def result_dict(result: BenchResult, with_chunks: bool = True) -> dict:
    return {"tool": "tokenmill bench", "version": __version__, "mode": result.mode,
            "started_at": result.started_at, "finished_at": result.finished_at,
            "definitions": DEFINITIONS, "target": result.target, "workload": result.workload,
            "settings": result.settings, "sweep": result.sweep, "plan": result.plan,
            "token_timing": result.token_timing,
            "runs": [run.to_dict(with_requests=True, with_chunks=with_chunks) for run in result.runs]}


def _clean(obj):
    """JSON without NaN/inf (written as null / "inf")."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def dump_json(data: dict) -> str:
    """Indented JSON, except each request on one line (a run of thousands of requests stays readable
    with grep and small on disk)."""
    compact = lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    runs = []
    for run in data["runs"]:
        head = {k: v for k, v in run.items() if k != "requests"}
        text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
        requests = ",\n".join(compact(r) for r in run.get("requests", []))
        runs.append(text + ',\n "requests": [\n' + requests + "\n]}")
    head = json.dumps({k: v for k, v in data.items() if k != "runs"}, indent=1, ensure_ascii=False)[:-2]
    return head + ',\n "runs": [\n' + ",\n".join(runs) + "\n]}\n"


def load_result(path: str | Path) -> BenchResult:
    data = json.loads(Path(path).read_text())
    return BenchResult(mode=data["mode"], target=data["target"], workload=data["workload"],
                       runs=[RunResult.from_dict(r) for r in data["runs"]], settings=data.get("settings", {}),
                       sweep=data.get("sweep"), plan=data.get("plan"), token_timing=data.get("token_timing"),
                       started_at=data.get("started_at", ""), finished_at=data.get("finished_at", ""))


# ---- CSV ------------------------------------------------------------------------------------------------------

REQUEST_COLUMNS = ["run", "index", "conversation", "turn", "status", "error_kind", "http_status", "scheduled_s",
                   "send_s", "end_s", "input_tokens", "cached_tokens", "output_tokens", "max_tokens", "ttft", "tpot",
                   "ttlt", "e2el", "tokens_per_s_per_user", "itl_mean", "itl_max", "itl_basis", "finish_reason",
                   "error"]


def write_requests_csv(result: BenchResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REQUEST_COLUMNS)
        writer.writeheader()
        for run in result.runs:
            for r in run.records:
                row = {k: v for k, v in r.to_dict(with_chunks=False).items() if k in REQUEST_COLUMNS}
                row["run"] = run.name
                row["itl_mean"] = sum(r.itls) / len(r.itls) if r.itls else None
                row["itl_max"] = max(r.itls) if r.itls else None
                writer.writerow(row)


def run_row(run: RunResult) -> dict:
    s = run.summary
    row = {"run": run.name, "mode": run.mode, "offered_rate": run.offered_rate, "concurrency": run.concurrency,
           "requests": s["requests"], "completed": s["completed"], **{f"n_{k}": v for k, v in s["status_counts"].items()
                                                                      if k != "ok"},
           "failure_kinds": ";".join(f"{k}={v}" for k, v in s["failure_kinds"].items()),
           "duration_s": s["duration_s"], "request_throughput": s["request_throughput"],
           "input_throughput": s["input_throughput"], "output_throughput": s["output_throughput"],
           "mean_input_tokens": s["mean_input_tokens"], "mean_output_tokens": s["mean_output_tokens"],
           "cache_hit_rate": s["cache_hit_rate"]}
    for metric in (*LATENCIES, "tokens_per_s_per_user"):
        for key in ("mean", "p10", "p50", "p90", "p95", "p99", "max"):
            row[f"{metric}_{key}"] = s[metric][key]
    slo = s.get("slo") or {}
    row.update(slo_met=slo.get("met"), goodput=slo.get("goodput"), slo_attainment=slo.get("attainment"),
               saturated=run.saturated)
    cost = s.get("cost") or {}
    row.update(output_mtok_per_dollar=cost.get("output_mtok_per_dollar"),
               total_mtok_per_dollar=cost.get("total_mtok_per_dollar"))
    return row


def write_runs_csv(result: BenchResult, path: Path) -> None:
    rows = [run_row(run) for run in result.runs]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ---- plots ----------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _ordered(runs: list[RunResult]) -> list[RunResult]:
    return sorted(runs, key=lambda r: r.summary["request_throughput"])


def _short(run: RunResult) -> str:
    if run.mode == "rate" and run.offered_rate is not None and math.isfinite(run.offered_rate):
        return f"{run.offered_rate:.3g}/s"
    if run.mode == "concurrency":
        return f"c={run.concurrency}"
    return {"sequential": "seq"}.get(run.mode, run.mode)


def plot_latency_throughput(result: BenchResult, path: Path) -> bool:
    runs = [r for r in result.runs if r.summary["completed"]]
    if len(runs) < 2:
        return False
    plt = _plt()
    slo = result.workload.get("slo", {}) if isinstance(result.workload, dict) else {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    runs = _ordered(runs)
    x = [r.summary["output_throughput"] for r in runs]
    for ax, metric, title in zip(axes, ("ttft", "tpot", "ttlt"), ("TTFT", "TPOT", "time to last token")):
        for key, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            y = [(r.summary[metric][key] or float("nan")) * MS for r in runs]
            ax.plot(x, y, style, label=key)
        for i, (xi, r) in enumerate(zip(x, runs)):
            met = (r.summary.get("slo") or {}).get("met")
            y50 = (r.summary[metric]["p50"] or float("nan")) * MS
            ax.annotate(_short(r) + ("" if met is None else (" ✓" if met else " ✗")), (xi, y50), fontsize=7,
                        xytext=(2, 4 if i % 2 == 0 else -10), textcoords="offset points",
                        color="black" if met is None or met else "red")
        limit = slo.get(f"{metric}_ms")
        if limit:
            ax.axhline(limit, color="red", linewidth=1, linestyle="--",
                       label=f"SLO p{slo.get('percentile', 90):g} {limit:g} ms")
        ax.set_title(f"{title} vs throughput")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _cdf(ax, values, label):
    import numpy as np

    values = np.sort(np.asarray(values, dtype=float))
    if values.size:
        ax.plot(values * MS, np.arange(1, values.size + 1) / values.size, label=label, drawstyle="steps-post")


def plot_cdfs(result: BenchResult, path: Path) -> bool:
    runs = [r for r in result.runs if r.summary["completed"]]
    if not runs:
        return False
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for run in _ordered(runs):
        ok = [r for r in run.records if r.ok]
        _cdf(a, [r.ttft for r in ok], run.name)
        _cdf(b, [v for r in ok for v in r.itls], run.name)
    a.set_title("TTFT CDF")
    b.set_title("ITL CDF (per token)")
    for ax in (a, b):
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if ax is a else "fraction of tokens")
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        for q in (0.5, 0.9, 0.99):
            ax.axhline(q, color="grey", linewidth=0.5)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_tokens_over_time(result: BenchResult, path: Path) -> bool:
    import numpy as np

    runs = [r for r in result.runs if r.records]
    if not runs:
        return False
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for run in _ordered(runs):
        events = sorted((r.send_s + t, k) for r in run.records for t, k in r.chunks)
        if events:
            times = np.array([e[0] for e in events])
            a.plot(times, np.cumsum([e[1] for e in events]), label=run.name)
        steps = sorted([(r.send_s, 1) for r in run.records] + [(r.end_s, -1) for r in run.records])
        if steps:
            b.step([s[0] for s in steps], np.cumsum([s[1] for s in steps]), where="post", label=run.name)
    a.set_title("output tokens received over time")
    a.set_ylabel("tokens (cumulative)")
    b.set_title("requests in flight")
    b.set_ylabel("requests")
    for ax in (a, b):
        ax.set_xlabel("seconds since the run started")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_token_timing(timing: dict, path: Path) -> bool:
    import numpy as np

    itls = np.asarray(timing.get("example_itls") or [], dtype=float)
    if itls.size == 0:
        return False
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    t = np.concatenate([[0.0], np.cumsum(itls)])
    a.plot(t, np.arange(1, t.size + 1), linewidth=1)
    stalls = np.nonzero(itls > timing["threshold_s"])[0]
    a.scatter(t[stalls + 1], stalls + 2, color="red", s=12, zorder=3,
              label=f"stalls > {timing['threshold_s'] * MS:.0f} ms ({stalls.size})")
    a.set_title(f"one simulated {timing['tokens']}-token completion")
    a.set_xlabel("seconds after the first token")
    a.set_ylabel("tokens shown")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.plot(np.arange(2, itls.size + 2), itls * MS, ".", markersize=2)
    for key, color in (("itl_p50_s", "green"), ("itl_p95_s", "orange"), ("itl_p99_s", "red")):
        b.axhline(timing[key] * MS, color=color, linewidth=1, label=f"{key[4:7]} {timing[key] * MS:.1f} ms")
    b.axhline(timing["threshold_s"] * MS, color="black", linestyle="--", linewidth=1,
              label=f"stall threshold {timing['threshold_s'] * MS:.0f} ms")
    if itls.max() > 20 * max(itls.min(), 1e-6):
        b.set_yscale("log")
    b.set_title("inter-token latency of each token")
    b.set_xlabel("token")
    b.set_ylabel("ms")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


# ---- console and HTML tables --------------------------------------------------------------------------------

def _ms(v) -> str:
    return "-" if v is None else f"{v * MS:.1f}"


def _num(v, fmt="{:.2f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, str):
        return v
    return fmt.format(v)


RUN_COLUMNS = ["run", "ok/total", "failures", "req/s", "in tok/s", "out tok/s", "TTFT p50/p90/p99 ms",
               "TPOT p50/p90/p99 ms", "ITL p50/p99 ms", "TTLT p50/p99 s", "tok/s/user p50/p10", "goodput req/s",
               "SLO", "out Mtok/$"]


def run_cells(run: RunResult) -> list[str]:
    s = run.summary
    slo = s.get("slo")
    cost = s.get("cost") or {}
    failures = ", ".join(f"{k} {v}" for k, v in s["failure_kinds"].items()) or "-"
    user = s["tokens_per_s_per_user"]
    verdict = "-" if slo is None else ("met" if slo["met"] else "missed")
    if run.saturated:
        verdict += " (saturated)"
    return [run.name, f"{s['completed']}/{s['requests']}", failures, _num(s["request_throughput"]),
            _num(s["input_throughput"], "{:.0f}"), _num(s["output_throughput"], "{:.1f}"),
            "/".join(_ms(s["ttft"][k]) for k in ("p50", "p90", "p99")),
            "/".join(_ms(s["tpot"][k]) for k in ("p50", "p90", "p99")),
            "/".join(_ms(s["itl"][k]) for k in ("p50", "p99")),
            "/".join(_num(s["ttlt"][k]) for k in ("p50", "p99")),
            "/".join(_num(user[k], "{:.1f}") for k in ("p50", "p10")),
            _num(slo["goodput"]) if slo else "-", verdict,
            _num(cost.get("output_mtok_per_dollar"), "{:.3g}")]


def workload_rows(workload: dict) -> list[tuple[str, str]]:
    from tokenmill.bench.workload import Workload

    try:
        return Workload.from_dict({k: v for k, v in workload.items()}).describe()
    except (ValueError, TypeError, KeyError, OSError):
        return [(k, json.dumps(v)) for k, v in workload.items()]


FIGURES = {
    "tokens_per_s_per_user": ("tokens/s per user p50 / p10", lambda s: "/".join(
        _num(s["tokens_per_s_per_user"][k], "{:.1f}") for k in ("p50", "p10"))),
    "ttft": ("TTFT p50 / p99", lambda s: f"{_ms(s['ttft']['p50'])} / {_ms(s['ttft']['p99'])} ms"),
    "tpot": ("TPOT p50 / p99", lambda s: f"{_ms(s['tpot']['p50'])} / {_ms(s['tpot']['p99'])} ms"),
    "ttlt": ("time to last token p50 / p99", lambda s: f"{_num(s['ttlt']['p50'])} / {_num(s['ttlt']['p99'])} s"),
    "e2el": ("E2E latency p50 / p99", lambda s: f"{_num(s['e2el']['p50'])} / {_num(s['e2el']['p99'])} s"),
    "mtok_per_dollar": ("output / total Mtok per $", lambda s: "{} / {}".format(
        _num((s.get("cost") or {}).get("output_mtok_per_dollar"), "{:.3g}"),
        _num((s.get("cost") or {}).get("total_mtok_per_dollar"), "{:.3g}"))),
}


def figure_of_merit_lines(result: BenchResult) -> list[str]:
    """The workload's figures of merit, at the best run within the SLOs (else each run's)."""
    wanted = [f for f in (result.workload.get("figure_of_merit") or []) if f in FIGURES]
    if not wanted or not result.runs:
        return []
    best = (result.sweep or {}).get("max_slo_run")
    runs = [r for r in result.runs if r.name == best] or result.runs
    lines = []
    for run in runs:
        values = "; ".join(f"{FIGURES[f][0]} {FIGURES[f][1](run.summary)}" for f in wanted)
        lines.append(f"figure of merit ({run.name}): {values}")
    return lines


def verdict_lines(result: BenchResult) -> list[str]:
    lines = figure_of_merit_lines(result)
    if result.sweep:
        sw = result.sweep
        lines.append(f"sweep: sequential {sw['min_rate']:.3g} req/s .. burst {sw['max_rate']:.3g} req/s; rates tried "
                     + (", ".join(f"{r:.3g}" for r in sw["rates"]) or "none"))
        if sw.get("refined_rates"):
            lines.append("refined between the last met and the first missed rate: " +
                         ", ".join(f"{r:.3g}" for r in sw["refined_rates"]))
        if sw.get("stop_reason"):
            lines.append(f"stopped early: {sw['stop_reason']}; skipped " +
                         ", ".join(f"{r:.3g}" for r in sw["skipped_rates"]))
        if sw.get("max_slo_rate") is not None:
            lines.append(f"highest rate meeting the SLOs: {sw['max_slo_rate']:.3g} req/s ({sw['max_slo_run']})")
            if sw.get("slo_note"):
                lines.append(sw["slo_note"])
        else:
            lines.append("no run met the SLOs")
    return lines


def plan_rows(plan: dict) -> list[tuple[str, str]]:
    if plan is None:
        return []
    if "error" in plan:
        return [("plan", plan["error"])]
    fields = {k: v for k, v in plan.items() if k in CapacityPlan.__dataclass_fields__}
    rows = format_plan(CapacityPlan(**fields))
    if plan.get("from_run"):
        rows.insert(0, ("from run", plan["from_run"]))
    return rows


def print_summary(result: BenchResult, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    if not console.is_terminal or console.width < 160:
        console = Console(file=file, width=200)
    info = Table(show_header=False, box=None)
    for key, value in [("target", f"{result.target.get('base_url')} model {result.target.get('model')} "
                                  f"({result.target.get('server')})"), *workload_rows(result.workload)]:
        info.add_row(f"[bold]{key}", value)
    console.print(info)
    table = Table(title=f"tokenmill bench {result.mode}", header_style="bold")
    for column in RUN_COLUMNS:
        table.add_column(column, overflow="fold")
    for run in result.runs:
        table.add_row(*run_cells(run))
    console.print(table)
    for line in verdict_lines(result):
        console.print(line)
    if result.token_timing:
        from tokenmill.bench.token_timing import TokenTiming

        console.print(f"[bold]token timing[/bold] (run {result.token_timing.get('run')}):")
        timing = TokenTiming(**{k: v for k, v in result.token_timing.items() if k != "run"})
        for line in timing.lines():
            console.print("  " + line)
    if result.plan:
        console.print("[bold]capacity plan[/bold]")
        for key, value in plan_rows(result.plan):
            console.print(f"  {key}: {value}")
        for note in result.plan.get("notes") or []:
            console.print(f"  - {note}")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .5em;text-align:left}
th{background:#f4f4f4}tr.met td.slo{color:#176f2c;font-weight:bold}tr.missed td.slo{color:#b00020;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.kv td:first-child{font-weight:bold;white-space:nowrap}
code{background:#f4f4f4;padding:0 .2em}.small{font-size:.85em;color:#555}
"""


def _kv_table(rows) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def render_html(result: BenchResult, images: dict[str, Path]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tokenmill bench {e(result.mode)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>tokenmill bench {e(result.mode)}: {e(str(result.workload.get('name', '')))}</h1>",
             f"<p class='small'>{e(result.started_at)} to {e(result.finished_at)} &middot; tokenmill {e(__version__)}"
             f" &middot; target <code>{e(str(result.target.get('base_url')))}</code> model "
             f"<code>{e(str(result.target.get('model')))}</code> ({e(str(result.target.get('server')))})</p>",
             "<h2>Workload</h2>", _kv_table(workload_rows(result.workload))]
    verdict = verdict_lines(result)
    if verdict:
        parts.append("<h2>Verdict</h2><ul>" + "".join(f"<li>{e(line)}</li>" for line in verdict) + "</ul>")
    header = "".join(f"<th>{e(c)}</th>" for c in RUN_COLUMNS)
    rows = []
    for run in result.runs:
        cells = run_cells(run)
        slo = run.summary.get("slo")
        cls = "" if slo is None else ("met" if slo["met"] else "missed")
        rows.append(f"<tr class='{cls}'>" + "".join(
            f"<td class='{'slo' if i == 12 else ''}'>{e(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    parts.append(f"<h2>Runs</h2><table><tr>{header}</tr>{''.join(rows)}</table>")
    captions = {"latency_throughput": "Latency vs throughput over the runs (p50, p90, p99; SLO limits dashed)",
                "cdf": "TTFT and per-token ITL distributions",
                "tokens_over_time": "Output tokens received and requests in flight over each run",
                "token_timing": "Token timing: what one user sees over a long completion"}
    for key, caption in captions.items():
        if key == "token_timing":
            continue
        if key in images:
            data = base64.b64encode(Path(images[key]).read_bytes()).decode()
            parts.append(f"<h2>{e(caption)}</h2><img alt='{e(key)}' src='data:image/png;base64,{data}'>")
    if result.token_timing:
        from tokenmill.bench.token_timing import TokenTiming

        timing = TokenTiming(**{k: v for k, v in result.token_timing.items() if k != "run"})
        parts.append(f"<h2>Token timing (ITLs of run {e(str(result.token_timing.get('run')))})</h2><ul>"
                     + "".join(f"<li>{e(line)}</li>" for line in timing.lines()) + "</ul>")
        if "token_timing" in images:
            data = base64.b64encode(Path(images["token_timing"]).read_bytes()).decode()
            parts.append(f"<img alt='token_timing' src='data:image/png;base64,{data}'>")
    if result.plan:
        parts.append("<h2>Capacity plan</h2>" + _kv_table(plan_rows(result.plan)))
        notes = result.plan.get("notes") or []
        if notes:
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Definitions</h2>" + _kv_table(DEFINITIONS.items()))
    parts.append("<h2>Settings</h2>" + _kv_table([*result.target.items(), *result.settings.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(result: BenchResult, result_dir: str | Path, name: str = "bench", plots: bool = True,
                  with_chunks: bool = True) -> dict[str, Path]:
    """Write <name>.json, <name>-requests.csv, <name>-runs.csv, the PNGs and <name>.html; returns the paths."""
    out = Path(result_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = out / f"{name}.json"
    paths["json"].write_text(dump_json(_clean(result_dict(result, with_chunks))))
    paths["requests_csv"] = out / f"{name}-requests.csv"
    write_requests_csv(result, paths["requests_csv"])
    paths["runs_csv"] = out / f"{name}-runs.csv"
    write_runs_csv(result, paths["runs_csv"])
    images: dict[str, Path] = {}
    if plots:
        makers = {"latency_throughput": lambda p: plot_latency_throughput(result, p),
                  "cdf": lambda p: plot_cdfs(result, p),
                  "tokens_over_time": lambda p: plot_tokens_over_time(result, p),
                  "token_timing": lambda p: bool(result.token_timing) and plot_token_timing(result.token_timing, p)}
        for key, make in makers.items():
            path = out / f"{name}-{key.replace('_', '-')}.png"
            if make(path):
                images[key] = path
        paths.update({f"png_{k}": v for k, v in images.items()})
        paths["html"] = out / f"{name}.html"
        paths["html"].write_text(render_html(result, images))
    return paths
