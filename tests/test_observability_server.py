"""Observability of a real `tokenmill serve`: request ids through both processes' (JSON) logs and
the responses, timing breakdowns, /v1/stats, the Grafana dashboard's metric names, and the live
dashboard in a real headless Chromium (Debian's `chromium`, installed here when missing and apt is
available). The dashboard screenshot is written to tests/artifacts/dashboard.png."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tokenmill.testing.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def server(llama_dir):
    old = os.environ.get("TOKENMILL_LOG_JSON")
    os.environ["TOKENMILL_LOG_JSON"] = "1"  # both processes log JSON lines
    try:
        proc = ServerProcess(llama_dir, "--num-kv-blocks", "256", "--max-num-seqs", "16",
                             "--max-num-batched-tokens", "128")
    finally:
        if old is None:
            os.environ.pop("TOKENMILL_LOG_JSON", None)
        else:
            os.environ["TOKENMILL_LOG_JSON"] = old
    yield proc
    proc.stop()


def json_log(server) -> list[dict]:
    entries = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


def wait_for_log(server, predicate, timeout=10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in json_log(server) if predicate(e)]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def parse_timing(header: str) -> dict:
    return {k: (float(v) if v else None) for k, v in (part.split("=") for part in header.split(";"))}


# ---- tracing --------------------------------------------------------------------------------------------

def test_request_id_in_both_processes_logs_and_the_response(server):
    rid = "trace-test-0001"
    response = httpx.post(server.url + "/v1/completions", headers={"X-Request-Id": rid}, timeout=30,
                          json={"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200 and response.headers["x-request-id"] == rid
    timing = parse_timing(response.headers["x-tokenmill-timing"])
    assert set(timing) == {"queue_ms", "prefill_ms", "cached_prompt_tokens", "decode_ms", "detokenize_ms", "e2e_ms"}
    assert timing["queue_ms"] >= 0 and timing["prefill_ms"] > 0 and timing["decode_ms"] > 0
    assert timing["detokenize_ms"] > 0 and timing["cached_prompt_tokens"] == 0
    assert timing["e2e_ms"] == pytest.approx(timing["queue_ms"] + timing["prefill_ms"] + timing["decode_ms"], abs=0.01)
    assert "prefill;dur=" in response.headers["server-timing"]

    core = wait_for_log(server, lambda e: e["request_id"] == rid and e["process"] != "MainProcess"
                        and "finished" in e["msg"])
    api = wait_for_log(server, lambda e: e["request_id"] == rid and e["process"] == "MainProcess")
    assert core and core[0]["logger"] == "tokenmill.engine.engine_core" and core[0]["output_tokens"] == 6
    assert core[0]["process"] == "tokenmill-engine-core"
    assert {e["msg"].split(":")[0].split()[-1] for e in api} >= {"submitted", "(length)"}
    finished = [e for e in api if "finished" in e["msg"]][0]
    assert finished["prefill_ms"] == timing["prefill_ms"] and finished["output_tokens"] == 6
    # every line names the same engine request as the response id
    engine_id = response.json()["id"]
    assert all(engine_id in e["msg"] for e in core + api)


def test_generated_request_id_and_streaming_timing(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        rid = r.headers["x-request-id"]
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert re.fullmatch(r"req-[0-9a-f]{32}", rid)
    assert chunks[-1]["id"] == "chatcmpl-" + rid[4:]  # a generated trace id shares the response id's uuid
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("timing" not in c for c in chunks[:-1])
    timing = chunks[-1]["timing"]
    assert timing["decode_ms"] > 0 and timing["e2e_ms"] > 0 and timing["queue_ms"] is not None
    assert wait_for_log(server, lambda e: e["request_id"] == rid and e["process"] == "tokenmill-engine-core")

    body = {"prompt": "The engine", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"X-Request-Id": "has spaces\tand tabs"}) as r:
        assert r.headers["x-request-id"] == "has_spaces_and_tabs"
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["timing"]["decode_ms"] > 0


def test_errors_carry_the_request_id(server):
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "temperature": -1},
                          headers={"X-Request-Id": "bad-one"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "bad-one"
    assert httpx.get(server.url + "/health").headers["x-request-id"].startswith("req-")


def test_prefix_cache_hits_show_in_timing(server):
    prompt = "A long shared system prompt that every turn repeats, again and again. " * 3
    httpx.post(server.url + "/v1/completions", json={"prompt": prompt + "Q1", "max_tokens": 2}, timeout=30)
    response = httpx.post(server.url + "/v1/completions", json={"prompt": prompt + "Q2", "max_tokens": 2},
                          timeout=30)
    cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 and parse_timing(response.headers["x-tokenmill-timing"])["cached_prompt_tokens"] == cached


# ---- stats, metrics, deploy files --------------------------------------------------------------------------

class BackgroundLoad:
    """Bounded load: `threads` clients sending short completions until stop(), `seconds` or
    `max_requests`, whichever comes first."""

    def __init__(self, server, seconds: float, threads: int = 3, max_requests: int = 400):
        self.deadline = time.monotonic() + seconds
        self.stopped = threading.Event()
        self.sent = 0
        self._lock = threading.Lock()
        self._server = server
        self._max = max_requests
        self.workers = [threading.Thread(target=self._client, daemon=True) for _ in range(threads)]
        for w in self.workers:
            w.start()

    def _client(self):
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < self.deadline and not self.stopped.is_set():
                with self._lock:
                    if self.sent >= self._max:
                        return
                    self.sent += 1
                    n = self.sent
                http.post(self._server.url + "/v1/completions",
                          json={"prompt": f"load {n} " + "word " * (n % 40), "max_tokens": 12, "ignore_eos": True})

    def stop(self):
        self.stopped.set()
        for w in self.workers:
            w.join(30)


def test_stats_endpoint_and_step_metrics_under_load(server):
    load = BackgroundLoad(server, 3.5)
    for w in load.workers:
        w.join(30)
    time.sleep(1.2)  # one more sample after the load
    stats = httpx.get(server.url + "/v1/stats").json()
    series = stats["series"]
    assert stats["interval_s"] == 1.0 and stats["device_timing"] == "wall" and stats["healthy"]
    assert len(series["t"]) >= 3 and series["t"] == sorted(series["t"])
    assert max(v or 0 for v in series["gen_tok_s"]) > 0
    assert any(v is not None for v in series["ttft_p99"]) and any(v is not None for v in series["itl_p50"])
    assert max(v or 0 for v in series["running"]) > 0 and any(v is not None for v in series["gpu_busy"])
    assert all(v is None for v in series["gpu_power_w"]) or stats["gpus"]  # NVML only where a GPU is
    text = httpx.get(server.url + "/metrics").text
    for name in ("step_gpu_time_seconds_count", "step_idle_seconds_count", "step_scheduling_time_seconds_sum",
                 "step_batch_size_bucket", "step_prefill_tokens_sum", "step_decode_tokens_sum",
                 "gpu_busy_fraction", "request_detokenize_time_seconds_count"):
        assert f"tokenmill:{name}" in text, name
    assert server.metric("step_gpu_time_seconds_count") > 10
    assert 0 < server.metric("gpu_busy_fraction") <= 1
    assert "tokenmill:step_kv_cache_usage_perc_bucket" in text
    if not stats["gpus"]:   # without NVML the GPU gauges are absent, not zero
        assert "tokenmill:gpu_power_watts" not in text and "tokenmill:gpu_temperature_celsius" not in text


def referenced_metric_names(text: str) -> set[str]:
    return set(re.findall(r"tokenmill:[A-Za-z0-9_:]+", text))


def exported_metric_names(server) -> set[str]:
    from fake_nvml import fake_nvml
    from tokenmill.ops.gpu_telemetry import GpuTelemetry

    names = set()
    registry = CollectorRegistry()
    GpuTelemetry(registry, nvml=fake_nvml(xids=[(0, 79)])).start(thread=False)  # every NVML gauge, as on a GPU
    for text in (httpx.get(server.url + "/metrics").text, generate_latest(registry).decode()):
        names |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    return names


def test_deploy_files_reference_only_exported_metrics(server):
    import yaml

    httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})  # a finished request
    exported = exported_metric_names(server)
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    used = referenced_metric_names("\n".join(exprs))
    assert len(used) >= 30
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    for needed in ("tokenmill:time_to_first_token_seconds_bucket", "tokenmill:inter_token_latency_seconds_bucket",
                   "tokenmill:e2e_request_latency_seconds_bucket", "tokenmill:generation_tokens_total",
                   "tokenmill:num_requests_running", "tokenmill:num_requests_waiting",
                   "tokenmill:kv_cache_usage_perc", "tokenmill:num_preemptions_total",
                   "tokenmill:prefix_cache_hits_total", "tokenmill:gpu_power_watts",
                   "tokenmill:gpu_temperature_celsius", "tokenmill:gpu_sm_utilization_perc",
                   "tokenmill:gpu_busy_fraction"):
        assert needed in used, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["localhost:8000"]
    for rule_file in prometheus["rule_files"]:
        rules = yaml.safe_load((ROOT / "deploy" / rule_file).read_text())
        used = referenced_metric_names("\n".join(r["expr"] for g in rules["groups"] for r in g["rules"]))
        assert used and used <= exported, f"not exported: {sorted(used - exported)}"


# ---- the dashboard in a real browser ---------------------------------------------------------------------

def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (CI runs as root); else skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get cannot install it here (not root or no apt)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"could not install chromium with apt-get: {result.stderr.strip()[-500:]}")
    return found


def run_chromium(browser: str, url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1250",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", *args, url],
            capture_output=True, text=True, timeout=90)


def test_dashboard_page_is_self_contained(server):
    response = httpx.get(server.url + "/dashboard")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script src" not in page and "<link rel=\"stylesheet\"" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # an XML namespace name, never fetched


def test_dashboard_in_headless_chromium_under_load(server):
    browser = chromium()
    load = BackgroundLoad(server, 30.0)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            series = httpx.get(server.url + "/v1/stats").json()["series"]
            if sum(1 for v in series["gen_tok_s"][-5:] if v) >= 3 and any(series["ttft_p50"][-3:]):
                break
            time.sleep(0.25)
        url = server.url + "/dashboard"
        dom = run_chromium(browser, url, "--dump-dom")
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        screenshot.unlink(missing_ok=True)
        shot = run_chromium(browser, url, f"--screenshot={screenshot}")
    finally:
        load.stop()
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    body = re.search(r"<body ([^>]*)>", html).group(1)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body))
    assert int(attrs["data-polls"]) >= 1, body
    assert attrs["data-errors"] == "0" and attrs["data-fetch-errors"] == "0", html[-3000:]
    assert re.search(r'<pre id="errors"></pre>', html)
    points = dict(re.findall(r'id="chart-(\w+)" data-points="(\d+)"', html))
    for chart in ("ttft", "itl", "tokens", "requests", "kv", "prefix", "busy", "steps"):
        assert int(points[chart]) > 0, (chart, points)
    assert html.count("<path ") >= 8
    console = [line for line in dom.stderr.splitlines() + shot.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no console errors (nor any console output at all)
    assert shot.returncode == 0 and screenshot.exists() and screenshot.stat().st_size > 20_000, shot.stderr[-2000:]
