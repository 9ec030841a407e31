"""The live dashboard at GET /dashboard: one self-contained HTML page (inline CSS, inline JS, SVG
charts drawn by that JS; nothing loaded from anywhere but this server, so it works offline).

It polls GET /v1/stats every second and plots the last minutes of the API process's `LiveStats`
ring buffer. For tests and scripts the page reports on itself in the DOM: `<body data-polls=N
data-errors=M data-fetch-errors=K>`, each chart's `data-points` (non-null points drawn), and any
JavaScript error text in `<pre id="errors">`.
"""

from __future__ import annotations

import html

# (chart id, title, unit suffix, scale, [(series key, label, colour)], fixed y max or None, note when empty)
CHARTS = [
    ("ttft", "Time to first token", "ms", 1e3,
     [("ttft_p50", "p50", "#1f77b4"), ("ttft_p95", "p95", "#ff7f0e"), ("ttft_p99", "p99", "#d62728")], None,
     "no first tokens in the window"),
    ("itl", "Inter-token latency", "ms", 1e3,
     [("itl_p50", "p50", "#1f77b4"), ("itl_p95", "p95", "#ff7f0e"), ("itl_p99", "p99", "#d62728")], None,
     "no tokens in the window"),
    ("tokens", "Tokens per second", "tok/s", 1,
     [("gen_tok_s", "generated", "#2ca02c"), ("prompt_tok_s", "prompt", "#9467bd")], None, ""),
    ("requests", "Requests", "", 1, [("running", "running", "#1f77b4"), ("waiting", "waiting", "#d62728")], None,
     ""),
    ("kv", "KV-cache usage", "%", 100, [("kv_usage", "used", "#8c564b")], 100, ""),
    ("prefix", "Prefix-cache hit rate", "%", 100, [("prefix_hit_rate", "hit rate", "#17becf")], 100,
     "no prompts in the window"),
    ("busy", "GPU busy (engine steps)", "%", 100, [("gpu_busy", "busy", "#e377c2")], 100, "no steps in the window"),
    ("steps", "Engine step", "ms", 1,
     [("step_gpu_ms", "device", "#1f77b4"), ("step_idle_ms", "idle gap", "#d62728"),
      ("step_sched_ms", "scheduling", "#7f7f7f")], None, "no steps"),
    ("power", "GPU power", "W", 1, [("gpu_power_w", "draw", "#ff7f0e"), ("gpu_power_limit_w", "limit", "#7f7f7f")],
     None, "no GPU telemetry (NVML absent)"),
    ("temp", "GPU temperature", "\u00b0C", 1, [("gpu_temp_c", "core", "#d62728")], None,
     "no GPU telemetry (NVML absent)"),
    ("util", "GPU utilization (NVML)", "%", 100,
     [("gpu_util", "SM", "#2ca02c"), ("gpu_mem_util", "memory", "#9467bd")], 100, "no GPU telemetry (NVML absent)"),
]

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenmill dashboard: __MODEL__</title>
<link rel="icon" href="data:,">
<style>
  body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f7f9; color: #222; }
  header { padding: 10px 16px; background: #1d2330; color: #eee; display: flex; gap: 24px;
           align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 17px; margin: 0; }
  header .status { font-size: 13px; color: #bbb; }
  #summary { padding: 8px 16px; display: flex; gap: 20px; flex-wrap: wrap; font-size: 13px; }
  #summary b { font-variant-numeric: tabular-nums; }
  main { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 12px;
         padding: 4px 16px 16px; }
  .chart { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 8px 10px; }
  .chart h2 { font-size: 14px; margin: 0 0 4px; display: flex; justify-content: space-between; }
  .chart h2 .now { font-weight: normal; color: #555; font-variant-numeric: tabular-nums; }
  .legend { font-size: 12px; color: #444; display: flex; gap: 12px; }
  .legend i { display: inline-block; width: 10px; height: 3px; vertical-align: middle; margin-right: 4px; }
  svg { width: 100%; height: auto; display: block; }
  svg .grid { stroke: #eceef1; stroke-width: 1; }
  svg .axis { fill: #777; font-size: 11px; }
  svg .empty { fill: #999; font-size: 13px; }
  #errors { color: #b00; margin: 0 16px 16px; white-space: pre-wrap; }
  #errors:empty { display: none; }
</style>
</head>
<body data-polls="0" data-errors="0" data-fetch-errors="0">
<header>
  <h1>tokenmill &mdash; __MODEL__</h1>
  <span class="status" id="status">waiting for the first sample&hellip;</span>
</header>
<div id="summary"></div>
<main id="charts"></main>
<pre id="errors"></pre>
<script>
"use strict";
(function () {
  const CHARTS = __CHARTS__;
  const POLL_MS = 1000;
  const W = 600, H = 190, L = 52, R = 10, T = 10, B = 24;
  const body = document.body;
  const errorsEl = document.getElementById("errors");
  let polls = 0, errors = 0, fetchErrors = 0;

  function recordError(text) {
    errors += 1;
    body.dataset.errors = String(errors);
    errorsEl.textContent += text + "\\n";
  }
  window.addEventListener("error", (e) => recordError("error: " + (e.message || e.type)));
  window.addEventListener("unhandledrejection", (e) => recordError("unhandled rejection: " + String(e.reason)));
  // console.error calls (ours or the browser's bindings) count too, not only uncaught errors
  const consoleError = console.error.bind(console);
  console.error = (...args) => { recordError("console.error: " + args.map(String).join(" ")); consoleError(...args); };

  const SVG = "http://www.w3.org/2000/svg";
  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const cards = {};
  const main = document.getElementById("charts");
  for (const [id, title, unit, scale, series, ymax, emptyNote] of CHARTS) {
    const card = document.createElement("section");
    card.className = "chart";
    card.id = "chart-" + id;
    card.dataset.points = "0";
    const h2 = document.createElement("h2");
    h2.textContent = title + (unit ? " (" + unit + ")" : "");
    const now = document.createElement("span");
    now.className = "now";
    h2.appendChild(now);
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const [key, label, colour] of series) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = colour;
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(label));
      legend.appendChild(item);
    }
    const svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": title});
    card.appendChild(h2);
    card.appendChild(legend);
    card.appendChild(svg);
    main.appendChild(card);
    cards[id] = {card, svg, now, unit, scale, series, ymax, emptyNote};
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "-";
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 100) return v.toFixed(1);
    if (a >= 1) return v.toFixed(2);
    return v.toPrecision(2);
  }

  function draw(c, t, data, windowS) {
    const svg = c.svg;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const tEnd = t.length ? t[t.length - 1] : 0;
    const tStart = tEnd - windowS;
    let max = 0, points = 0;
    const lines = c.series.map(([key]) => (data[key] || []).map((v) => (v === null ? null : v * c.scale)));
    for (const line of lines) for (const v of line) if (v !== null && isFinite(v)) { max = Math.max(max, v); points++; }
    if (c.ymax !== null) max = Math.max(c.ymax, max); else max = max > 0 ? max * 1.1 : 1;
    const x = (ts) => L + (W - L - R) * (ts - tStart) / windowS;
    const y = (v) => T + (H - T - B) * (1 - v / max);
    for (let i = 0; i <= 4; i++) {
      const v = max * i / 4;
      svg.appendChild(el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
      svg.appendChild(el("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "axis"}, fmt(v)));
    }
    for (const s of [windowS, windowS * 2 / 3, windowS / 3, 0]) {
      const anchor = s === windowS ? "start" : (s === 0 ? "end" : "middle");
      svg.appendChild(el("text", {x: x(tEnd - s), y: H - 6, "text-anchor": anchor, class: "axis"},
                         s === 0 ? "now" : "-" + Math.round(s) + " s"));
    }
    lines.forEach((line, k) => {
      const colour = c.series[k][2];
      let d = "", pen = false, lone = [];
      for (let i = 0; i < line.length; i++) {
        const v = line[i];
        if (v === null || !isFinite(v) || t[i] < tStart) { pen = false; continue; }
        d += (pen ? " L" : " M") + x(t[i]).toFixed(1) + " " + y(v).toFixed(1);
        const next = i + 1 < line.length ? line[i + 1] : null;
        if (!pen && (next === null || !isFinite(next))) lone.push([x(t[i]), y(v)]);
        pen = true;
      }
      if (d) svg.appendChild(el("path", {d: d.trim(), fill: "none", stroke: colour, "stroke-width": 1.8,
                                          "data-series": c.series[k][0]}));
      for (const [px, py] of lone) svg.appendChild(el("circle", {cx: px, cy: py, r: 2.2, fill: colour}));
    });
    c.card.dataset.points = String(points);
    if (!points) {
      svg.appendChild(el("text", {x: (L + W - R) / 2, y: H / 2, "text-anchor": "middle", class: "empty"},
                         c.emptyNote || "no data yet"));
    }
    const latest = c.series.map(([key, label], k) => {
      const line = lines[k];
      for (let i = line.length - 1; i >= 0; i--) if (line[i] !== null) return label + " " + fmt(line[i]);
      return null;
    }).filter((s) => s !== null);
    c.now.textContent = latest.join(" \\u00b7 ");
  }

  function summary(stats) {
    const s = stats.series, n = s.t.length;
    const last = (k) => (n ? s[k][n - 1] : null);
    const parts = [
      ["running", last("running")], ["waiting", last("waiting")],
      ["KV", last("kv_usage") === null ? null : fmt(100 * last("kv_usage")) + " %"],
      ["gen tok/s", fmt(last("gen_tok_s"))],
      ["GPU busy", stats.gpu_busy_fraction === null ? "-" : fmt(100 * stats.gpu_busy_fraction) + " %"],
      ["KV capacity", stats.kv_capacity_tokens + " tokens"],
    ];
    if (stats.telemetry) parts.push(["NVML sample", fmt(stats.telemetry.mean_sample_cpu_ms) + " ms CPU"]);
    for (const [gpu, v] of Object.entries(stats.gpus || {})) {
      parts.push(["GPU " + gpu, (v.name || "") + (v.throttle_reasons && v.throttle_reasons.length ?
                  " (throttle: " + v.throttle_reasons.join(", ") + ")" : "")]);
    }
    const box = document.getElementById("summary");
    box.textContent = "";
    for (const [k, v] of parts) {
      const span = document.createElement("span");
      span.textContent = k + ": ";
      const b = document.createElement("b");
      b.textContent = v === null || v === undefined ? "-" : String(v);
      span.appendChild(b);
      box.appendChild(span);
    }
    if (stats.warnings && stats.warnings.length) {
      const span = document.createElement("span");
      span.style.color = "#b00";
      span.textContent = stats.warnings[stats.warnings.length - 1];
      box.appendChild(span);
    }
  }

  async function poll() {
    try {
      const response = await fetch("/v1/stats", {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const stats = await response.json();
      // The last minutes: from the oldest sample (at least one minute) up to the whole history.
      const t = stats.series.t, history = stats.history_s || 300;
      const span = t.length > 1 ? t[t.length - 1] - t[0] : 0;
      const windowS = Math.min(history, Math.max(60, Math.ceil(span / 30) * 30));
      for (const id in cards) draw(cards[id], stats.series.t, stats.series, windowS);
      summary(stats);
      polls += 1;
      body.dataset.polls = String(polls);
      document.getElementById("status").textContent = "updated " + new Date(stats.time * 1000).toLocaleTimeString() +
        " \\u00b7 " + stats.series.t.length + " samples, every " + stats.interval_s + " s" +
        (stats.healthy ? "" : " \\u00b7 ENGINE UNHEALTHY");
    } catch (e) {
      fetchErrors += 1;
      body.dataset.fetchErrors = String(fetchErrors);
      document.getElementById("status").textContent = "poll failed: " + e;
    }
  }
  poll();
  setInterval(poll, POLL_MS);
})();
</script>
</body>
</html>
"""


def dashboard_html(model_name: str) -> str:
    import json

    charts = json.dumps([[cid, title, unit, scale, [list(s) for s in series], ymax, note]
                         for cid, title, unit, scale, series, ymax, note in CHARTS])
    return _PAGE.replace("__MODEL__", html.escape(model_name)).replace("__CHARTS__", charts)
