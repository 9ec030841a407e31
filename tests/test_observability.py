"""Observability pieces without a server: step stats, step timer, live stats and the underfed-GPU
rule, GPU telemetry over a fake NVML, log formatting, `tokenmill tokens`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types

import pytest
from prometheus_client import CollectorRegistry

from fake_nvml import fake_nvml

from tokenmill import SamplingParams
from tokenmill.engine.messages import EngineCoreRequest, SchedulerStats
from tokenmill.ops.gpu_telemetry import GPU_METRIC_NAMES, GpuTelemetry, start_gpu_telemetry
from tokenmill.ops.step_timer import StepTimer
from tokenmill.ops.tracing import (JsonFormatter, RequestIdFilter, TextFormatter, request_id_var,
                                   sanitize_request_id)
from tokenmill.server.live_stats import LiveStats, WindowSummary, percentile, underfed_findings
from tokenmill.server.metrics import EngineMetrics

# ---- engine step stats ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core(llama_dir):
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore

    return EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_num_batched_tokens=32,
                                   enable_prefix_caching=False))


def _request(rid, n_prompt, max_tokens, trace=None):
    return EngineCoreRequest(rid, list(range(5, 5 + n_prompt)), SamplingParams(temperature=0, max_tokens=max_tokens),
                             (), 0.0, trace_id=trace)


def test_step_stats_count_tokens_batch_and_times(core, caplog):
    core.log_requests = True
    core.idle()
    core.runner.step_timer.collect()
    with caplog.at_level(logging.INFO, logger="tokenmill.engine.engine_core"):
        core.add_request(_request("a", 40, 3, trace="trace-a"))
        core.add_request(_request("b", 8, 3, trace="trace-b"))
        first = core.step().stats  # a: 32 prompt tokens (budget), b waits for budget
        second = core.step().stats  # a: last 8 prompt tokens + b: 8 prompt tokens
        third = core.step().stats  # two decodes
        while core.has_unfinished_requests():
            core.step()
    assert (first.num_prefill_tokens, first.num_decode_tokens, first.step_batch_size) == (32, 0, 1)
    assert (second.num_prefill_tokens, second.step_batch_size) == (16, 2)
    assert (third.num_prefill_tokens, third.num_decode_tokens, third.step_batch_size) == (0, 2, 2)
    for stats in (first, second, third):
        assert stats.device_timing == "wall"  # on the CPU: forward + sampling wall time
        assert len(stats.step_device_times) == 1 and stats.step_device_times[0] > 0
        assert 0 < stats.step_scheduling_time < stats.step_duration
        assert stats.step_device_times[0] <= stats.step_duration
    assert first.step_idle_times == []  # the engine was idle before: no gap to count
    assert len(second.step_idle_times) == 1 and 0 <= second.step_idle_times[0] < second.step_duration
    # one line per request when it arrives and when it leaves, tagged with its trace id
    tagged = [(r.request_id, r.getMessage()) for r in caplog.records]
    assert any(rid == "trace-a" and "queued" in msg for rid, msg in tagged)
    assert any(rid == "trace-b" and "finished (length)" in msg and "3 output tokens" in msg for rid, msg in tagged)
    core.log_requests = False


def test_abort_is_logged_and_idle_breaks_the_gap_chain(core, caplog):
    core.log_requests = True
    with caplog.at_level(logging.INFO, logger="tokenmill.engine.engine_core"):
        core.add_request(_request("c", 4, 50, trace="trace-c"))
        core.step()
        assert len(core.step().stats.step_idle_times) == 1
        core.abort_requests(["c"])
        core.idle()
        core.add_request(_request("d", 4, 2))
        assert core.step().stats.step_idle_times == []
        while core.has_unfinished_requests():
            core.step()
    assert any(r.request_id == "trace-c" and "finished (abort)" in r.getMessage() for r in caplog.records)
    assert any(r.request_id == "d" for r in caplog.records)  # no trace id: the engine id stands in
    core.log_requests = False


class FakeEvent:
    """A CUDA event on a fake timeline: record() stamps the clock; done when the test says so."""

    def __init__(self, clock):
        self.clock, self.t, self.done = clock, None, False

    def record(self):
        self.t = self.clock["now"]

    def query(self):
        return self.done

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3  # ms, as torch


def test_step_timer_cuda_events_read_when_complete():
    clock = {"now": 0.0}
    events = []

    def factory():
        events.append(FakeEvent(clock))
        return events[-1]

    timer = StepTimer(types.SimpleNamespace(type="cuda"), event_factory=factory)
    assert timer.kind == "cuda_events"
    timer.start()
    clock["now"] = 0.010
    timer.stop()  # step 1: 10 ms
    clock["now"] = 0.012
    timer.start()
    clock["now"] = 0.020
    timer.stop()  # step 2: 8 ms, 2 ms after step 1
    events[0].done = events[1].done = True  # step 1 finished on the device, step 2 not yet
    device, idle = timer.collect()
    assert device == pytest.approx([0.010]) and idle == []
    events[3].done = True
    device, idle = timer.collect()
    assert device == pytest.approx([0.008]) and idle == pytest.approx([0.002])
    timer.mark_idle()
    clock["now"] = 5.0
    timer.start()
    clock["now"] = 5.001
    timer.stop()
    events[5].done = True
    device, idle = timer.collect()
    assert device == pytest.approx([0.001]) and idle == []  # no gap across an idle period


def test_metrics_export_step_histograms():
    m = EngineMetrics("m")
    stats = SchedulerStats(num_running=3, num_prefill_tokens=10, num_decode_tokens=2, step_batch_size=3,
                           kv_cache_usage=0.25, step_scheduling_time=0.0002, step_duration=0.011, step_device_times=[0.01],
                           step_idle_times=[0.0008], device_timing="wall")
    for _ in range(4):
        m.record_stats(stats, 100)
    m.record_stats(SchedulerStats(), 100)  # after aborts: no step
    value = m.registry.get_sample_value
    labels = {"model_name": "m"}
    assert value("tokenmill:step_gpu_time_seconds_count", labels) == 4
    assert value("tokenmill:step_gpu_time_seconds_sum", labels) == pytest.approx(0.04)
    assert value("tokenmill:step_idle_seconds_sum", labels) == pytest.approx(0.0032)
    assert value("tokenmill:step_scheduling_time_seconds_count", labels) == 4
    assert value("tokenmill:step_batch_size_sum", labels) == 12
    assert value("tokenmill:step_prefill_tokens_sum", labels) == 40
    assert value("tokenmill:step_decode_tokens_sum", labels) == 8
    assert value("tokenmill:step_kv_cache_usage_perc_sum", labels) == pytest.approx(1.0)
    assert value("tokenmill:step_kv_cache_usage_perc_bucket", {**labels, "le": "0.2"}) == 0
    assert value("tokenmill:step_kv_cache_usage_perc_bucket", {**labels, "le": "0.3"}) == 4
    m.sample_live()
    assert value("tokenmill:gpu_busy_fraction", labels) == pytest.approx(0.04 / (0.04 + 0.0032))


# ---- live stats and the underfed-GPU rule ----------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _step(device=0.010, idle=0.002, running=8, prefill=0, decode=8):
    return SchedulerStats(num_running=running, num_prefill_tokens=prefill, num_decode_tokens=decode,
                          step_batch_size=running, step_scheduling_time=0.0005, step_duration=device + 0.001,
                          step_device_times=[device], step_idle_times=[idle], device_timing="cuda_events",
                          kv_cache_usage=0.25, prefix_cache_queries=0, prefix_cache_hits=0)


def test_percentile_nearest_rank():
    values = sorted(range(1, 101))
    assert percentile(values, 0.5) == 50 and percentile(values, 0.95) == 95 and percentile(values, 0.99) == 99
    assert percentile([], 0.5) is None and percentile([7.0], 0.99) == 7.0


def test_live_stats_points_and_series():
    clock = Clock()
    live = LiveStats(interval=1.0, history_s=5, window_s=3, clock=clock, wall_clock=clock)
    for second in range(7):
        for i in range(10):
            live.observe_ttft(0.1 * (i + 1))
            live.observe_itl(0.01)
            live.observe_tokens(generated=5, prompt=20)
            stats = _step()
            stats.prefix_cache_queries, stats.prefix_cache_hits = 100 * (second * 10 + i + 1), 25 * (second * 10 + i)
            live.record_stats(stats)
        clock.now += 1.0
        point = live.sample()
    assert len(live.points) == 5  # ring buffer of history_s / interval
    assert point["ttft_p50"] == pytest.approx(0.5) and point["ttft_p99"] == pytest.approx(1.0)
    assert point["itl_p95"] == pytest.approx(0.01)
    assert point["gen_tok_s"] == pytest.approx(50) and point["prompt_tok_s"] == pytest.approx(200)
    assert point["running"] == 8 and point["kv_usage"] == 0.25 and point["steps_s"] == pytest.approx(10)
    assert point["step_gpu_ms"] == pytest.approx(10) and point["step_idle_ms"] == pytest.approx(2)
    assert point["gpu_busy"] == pytest.approx(10 / 12)
    assert point["prefix_hit_rate"] == pytest.approx(0.25)
    assert point["gpu_power_w"] is None  # no telemetry
    series = live.series()
    assert len(series["t"]) == 5 and series["gen_tok_s"][-1] == point["gen_tok_s"]
    assert len(live.series(seconds=1.5)["t"]) == 2


class FakeTelemetry:
    def __init__(self, power, limit):
        self.values = {"power_w": power, "power_limit_w": limit, "temperature_c": 60.0}

    def summary(self):
        return self.values


def _run_window(live, clock, seconds, **step):
    for _ in range(seconds):
        for _ in range(20):
            live.record_stats(_step(**step))
        clock.now += 1.0
        live.sample()


def test_underfed_warning_when_busy_fraction_low_under_load(caplog):
    clock = Clock()
    live = LiveStats(interval=1.0, window_s=5, clock=clock, wall_clock=clock, telemetry=FakeTelemetry(690, 700))
    with caplog.at_level(logging.WARNING, logger="tokenmill.server.live_stats"):
        _run_window(live, clock, 4, device=0.006, idle=0.004)  # window not full yet
        assert not live.warnings
        _run_window(live, clock, 3, device=0.006, idle=0.004)  # 60 % busy
    assert len(live.warnings) == 1 and "busy 60%" in live.warnings[0]
    assert any("underfed GPU" in r.getMessage() for r in caplog.records)
    _run_window(live, clock, 5, device=0.006, idle=0.004)
    assert len(live.warnings) == 1  # once a minute at most


def test_underfed_warning_on_low_power_during_decode():
    clock = Clock()
    live = LiveStats(interval=1.0, window_s=5, clock=clock, wall_clock=clock, telemetry=FakeTelemetry(2000, 3000))
    _run_window(live, clock, 6, device=0.010, idle=0.0002)  # 98 % busy, all decode, 67 % of the power limit
    assert len(live.warnings) == 1 and "2000 W of its 3000 W limit" in live.warnings[0]
    clock2 = Clock()
    fed = LiveStats(interval=1.0, window_s=5, clock=clock2, wall_clock=clock2, telemetry=FakeTelemetry(2900, 3000))
    _run_window(fed, clock2, 6, device=0.010, idle=0.0002)
    assert fed.warnings == []
    prefill = LiveStats(interval=1.0, window_s=5, clock=clock2, wall_clock=clock2,
                        telemetry=FakeTelemetry(1000, 3000))
    _run_window(prefill, clock2, 6, device=0.010, idle=0.0002, prefill=500, decode=8)
    assert prefill.warnings == []  # not decode-heavy


def test_no_underfed_warning_without_load_or_on_cpu():
    w = WindowSummary(seconds=10, under_load=False, steps=5, busy_fraction=0.1, mean_device_ms=1, mean_idle_ms=9,
                      mean_sched_ms=0.1, mean_batch=1, decode_share=1.0, power_w=100, power_limit_w=700)
    assert underfed_findings(w) == []
    w.under_load = True
    assert [kind for kind, _ in underfed_findings(w)] == ["busy", "power"]
    clock = Clock()
    live = LiveStats(interval=1.0, window_s=3, clock=clock, wall_clock=clock)
    for _ in range(5):
        for _ in range(10):
            stats = _step(device=0.001, idle=0.009)
            stats.device_timing = "wall"
            live.record_stats(stats)
        clock.now += 1
        live.sample()
    assert live.warnings == []  # CPU wall timings: the rule does not apply
    idle = LiveStats(interval=1.0, window_s=3, clock=clock, wall_clock=clock)
    _run_window(idle, clock, 2, device=0.001, idle=0.009)
    for _ in range(3):
        clock.now += 1
        idle.sample()  # no steps: not under load
    assert idle.warnings == []


# ---- GPU telemetry over a fake NVML ----------------------------------------------------------------------

def test_gpu_telemetry_gauges_equal_nvml_readings(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    registry = CollectorRegistry()
    nvml = fake_nvml(ecc_supported=False, xids=[(0, 79)])
    telemetry = GpuTelemetry(registry, interval=1.0, nvml=nvml)
    assert telemetry.start(thread=False)
    value = registry.get_sample_value
    gpu0, gpu1 = {"gpu": "0"}, {"gpu": "1"}
    assert value("tokenmill:gpu_power_watts", gpu0) == 612.5 and value("tokenmill:gpu_power_watts", gpu1) == 100.0
    assert value("tokenmill:gpu_power_limit_watts", gpu0) == 700.0
    assert value("tokenmill:gpu_temperature_celsius", gpu0) == 71.0
    assert value("tokenmill:gpu_sm_utilization_perc", gpu0) == pytest.approx(0.97)
    assert value("tokenmill:gpu_memory_utilization_perc", gpu0) == pytest.approx(0.63)
    assert value("tokenmill:gpu_memory_used_bytes", gpu0) == 70 * 2**30
    assert value("tokenmill:gpu_memory_total_bytes", gpu0) == 80 * 2**30
    assert value("tokenmill:gpu_sm_clock_hertz", gpu0) == 1755e6
    assert value("tokenmill:gpu_clock_throttle_reasons", gpu0) == 0x24
    assert value("tokenmill:gpu_clock_throttle_active", {"gpu": "0", "reason": "sw_power_cap"}) == 1
    assert value("tokenmill:gpu_clock_throttle_active", {"gpu": "0", "reason": "hw_slowdown"}) == 0
    assert value("tokenmill:gpu_ecc_errors", {"gpu": "0", "type": "corrected"}) is None  # not supported: absent
    assert value("tokenmill:gpu_xid_errors_total", gpu0) == 1 and value("tokenmill:gpu_last_xid", gpu0) == 79
    assert value("tokenmill:gpu_xid_errors_total", gpu1) == 0
    assert value("tokenmill:gpu_telemetry_sample_seconds_count") == 1
    assert 0 < value("tokenmill:gpu_telemetry_sample_seconds_sum") < 0.1
    limit_calls = []
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda h: limit_calls.append(h) or 650_000
    telemetry.sample()
    assert value("tokenmill:gpu_telemetry_sample_seconds_count") == 2
    assert value("tokenmill:gpu_telemetry_sample_cpu_seconds_count") == 2
    # slow-changing readings are re-read every FULL_EVERY samples only, and carried over meanwhile
    assert limit_calls == [] and value("tokenmill:gpu_power_limit_watts", gpu0) == 700.0
    assert telemetry.latest[0]["power_limit_w"] == 700.0 and telemetry.latest[0]["mem_total_bytes"] == 80 * 2**30
    telemetry.samples = 30
    telemetry.sample()
    assert limit_calls == ["h0", "h1"] and value("tokenmill:gpu_power_limit_watts", gpu0) == 650.0
    assert telemetry.latest[0]["throttle_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert telemetry.summary()["power_w"] == 712.5 and telemetry.summary()["power_limit_w"] == 1300.0
    assert telemetry.summary()["temperature_c"] == 71.0
    telemetry.stop()
    assert nvml.calls["shutdown"] == 1


def test_gpu_telemetry_thread_and_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    registry = CollectorRegistry()
    telemetry = GpuTelemetry(registry, interval=0.05, nvml=fake_nvml())
    assert telemetry.start()
    try:
        import time

        deadline = time.monotonic() + 5
        while telemetry.samples < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert telemetry.samples >= 3
    finally:
        telemetry.stop()
    assert list(telemetry.latest) == [1]
    assert registry.get_sample_value("tokenmill:gpu_power_watts", {"gpu": "0"}) is None
    assert registry.get_sample_value("tokenmill:gpu_ecc_errors", {"gpu": "1", "type": "corrected"}) == 3


@pytest.mark.parametrize("how", ["import fails", "init fails", "real pynvml", "interval 0"])
def test_no_nvml_means_no_gpu_metrics_and_no_error(monkeypatch, how):
    import torch

    if how == "real pynvml" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    registry = CollectorRegistry()
    if how == "import fails":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
        assert start_gpu_telemetry(registry, 1.0) is None
    elif how == "init fails":
        assert not GpuTelemetry(registry, 1.0, nvml=fake_nvml(fail_init=True)).start()
    elif how == "real pynvml":
        assert start_gpu_telemetry(registry, 1.0) is None
    else:
        monkeypatch.setenv("TOKENMILL_GPU_TELEMETRY_INTERVAL", "0")
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
        assert start_gpu_telemetry(registry) is None
    from prometheus_client import generate_latest

    assert b"tokenmill:gpu" not in generate_latest(registry)


def test_gpu_metric_names_list_matches_exports():
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    telemetry = GpuTelemetry(registry, nvml=fake_nvml(xids=[(0, 48)]))
    assert telemetry.start(thread=False)
    exported = {line.split("{")[0].split(" ")[0] for line in generate_latest(registry).decode().splitlines()
                if line and not line.startswith("#")}
    assert exported == set(GPU_METRIC_NAMES)


# ---- log lines ------------------------------------------------------------------------------------------

def _record(msg="hello", **extra):
    record = logging.LogRecord("tokenmill.x", logging.INFO, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_request_id_filter_and_formatters():
    filt = RequestIdFilter()
    record = _record()
    token = request_id_var.set("req-ctx")
    try:
        filt.filter(record)
    finally:
        request_id_var.reset(token)
    assert record.request_id == "req-ctx"
    explicit = _record(request_id="given")
    filt.filter(explicit)
    assert explicit.request_id == "given"  # explicit extra wins over the context
    none = _record()
    filt.filter(none)
    assert none.request_id == "-"
    assert "tokenmill.x [req-ctx]: hello" in TextFormatter().format(record)
    assert "tokenmill.x: hello" in TextFormatter().format(none)
    line = JsonFormatter().format(_record(request_id="r1", fields={"queue_ms": 1.5}))
    entry = json.loads(line)
    assert entry["request_id"] == "r1" and entry["msg"] == "hello" and entry["level"] == "INFO"
    assert entry["queue_ms"] == 1.5 and entry["logger"] == "tokenmill.x" and "pid" in entry and "ts" in entry


def test_sanitize_request_id():
    assert sanitize_request_id("abc-123_X.y") == "abc-123_X.y"
    assert sanitize_request_id("has space\nand newline") == "has_space_and_newline"
    assert sanitize_request_id("x" * 500) == "x" * 128
    assert sanitize_request_id("") is None and sanitize_request_id(None) is None


# ---- tokenmill tokens -----------------------------------------------------------------------------------

def run_tokens(argv, capsys):
    from tokenmill.ops.tokens_cli import add_tokens_parser

    parser = argparse.ArgumentParser(prog="tokenmill")
    add_tokens_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tokens", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_tokens_prompt_table(llama_dir, llama_llm, capsys):
    tokenizer = llama_llm.get_tokenizer()
    out = run_tokens(["--model", str(llama_dir), "--prompt", "Hello  wörld\n"], capsys)
    ids = tokenizer.encode("Hello  wörld\n")
    assert f"ids: {ids}" in out and f"== {len(ids)} tokens ==" in out
    assert "decode(ids) == text: yes" in out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[1]) for r in rows] == ids
    assert "'\\n'" in out  # whitespace shown as repr
    assert "[special]" in out  # BOS
    report = json.loads(run_tokens(["--model", str(llama_dir), "--prompt", "Hello  wörld\n", "--json"], capsys))
    assert report["token_ids"] == ids and report["rendered_template"] is None
    assert "".join(tokenizer.decode([t["id"]]) for t in report["tokens"][1:]) == tokenizer.decode(ids[1:])
    assert bytes.fromhex("".join(t["bytes"].replace(" ", "") for t in report["tokens"][1:])).decode() == \
        "Hello  wörld\n"  # the bytes column spells the text exactly, partial characters included
    plain = json.loads(run_tokens(["--model", str(llama_dir), "--prompt", "Hi", "--no-special-tokens", "--json"],
                                  capsys))
    assert plain["token_ids"] == tokenizer.encode("Hi", add_special_tokens=False)


def test_tokens_chat_shows_rendered_template(llama_dir, llama_llm, tmp_path, capsys):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🎉"}]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(messages))
    out = run_tokens(["--model", str(llama_dir), "--chat", str(chat)], capsys)
    rendered = llama_llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    assert out.startswith("== rendered chat template ==\n" + rendered)
    assert repr(rendered) in out
    ids = llama_llm.get_tokenizer().encode(rendered, add_special_tokens=False)
    assert f"ids: {ids}" in out and "part of a character" in out  # the emoji's bytes split over tokens
    chat.write_text(json.dumps({"messages": messages}))
    report = json.loads(run_tokens(["--model", str(llama_dir), "--chat", str(chat), "--json",
                                    "--no-generation-prompt"], capsys))
    assert not report["rendered_template"].endswith("assistant\n") and report["round_trip"]


def test_tokens_bad_chat_file(llama_dir, tmp_path):
    from tokenmill.ops.tokens_cli import cmd_tokens

    bad = tmp_path / "bad.json"
    bad.write_text('{"role": "user"}')
    args = argparse.Namespace(model=str(llama_dir), tokenizer=None, prompt=None, chat=str(bad),
                              no_special_tokens=False, no_generation_prompt=False, json=False)
    with pytest.raises(ValueError, match="list of"):
        cmd_tokens(args)
