"""`tokenmill bench` end to end against a real `tokenmill serve` with a tiny model."""

from __future__ import annotations

import asyncio
import json

import pytest

from tokenmill.bench.cli import main
from tokenmill.bench.client import Target
from tokenmill.bench.runner import Bench
from tokenmill.bench.workload import archetype
from tokenmill.testing.server_process import ServerProcess
from test_bench_report import check_html

SMALL = ["--num-prompts", "4", "--length-scale", "0.05", "--output-len", "8", "--no-progress", "--quiet"]


@pytest.fixture(scope="module")
def server(llama_dir):
    proc = ServerProcess(llama_dir, "--num-kv-blocks", "256", "--max-num-seqs", "16",
                         "--max-num-batched-tokens", "256")
    yield proc
    proc.stop()


@pytest.mark.parametrize("mode", [["sequential"], ["burst"], ["rate", "20"], ["concurrency", "2"],
                                  ["sweep", "--num-rates", "1", "--workload", "data-processor"]])
def test_every_mode_against_a_real_server(server, mode, tmp_path):
    assert main(["bench", *mode, "--base-url", server.url, *SMALL, "--result-dir", str(tmp_path),
                 "--result-filename", "x", "--no-plots"]) == 0
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["target"]["server"] == "tokenmill" and data["target"]["return_token_ids"]
    for run in data["runs"]:
        assert run["summary"]["completed"] == run["summary"]["requests"] >= 4
        assert run["summary"]["itl_basis"] == ["token_ids"] and run["source"]["lengths_exact"]
        assert all(r["output_tokens"] == 8 and len(r["chunks"]) >= 1 for r in run["requests"])
    assert (tmp_path / "x-requests.csv").exists() and not (tmp_path / "x.html").exists()


def test_agent_turns_resend_exact_token_ids_and_hit_the_prefix_cache(server):
    w = archetype("agent").scaled(0.05)
    w.num_requests = 8

    async def go():
        async with Bench(Target(server.url), w) as bench:
            return await bench.concurrency(2)
    run = asyncio.run(go())
    assert run.summary["completed"] == 8 and run.source["stand_in_outputs"] == 0
    later = [r for r in run.records if r.turn > 0]
    assert later and all(r.cached_tokens >= 16 for r in later)
    assert run.summary["cache_hit_rate"] > 0.3


def test_recipe_on_a_local_engine_writes_every_output(llama_dir, tmp_path):
    assert main(["bench", "recipe", "--engine-model", str(llama_dir), "--engine-args", "--num-kv-blocks 256",
                 "--workload", "chatbot", "--num-prompts", "6", "--sequential-prompts", "3", "--num-rates", "2",
                 "--length-scale", "0.05", "--output-len", "6", "--goodput", "ttft:5000", "tpot:1000",
                 "--result-dir", str(tmp_path), "--result-filename", "recipe", "--no-progress", "--quiet"]) == 0
    data = json.loads((tmp_path / "recipe.json").read_text())
    assert data["mode"] == "recipe" and data["plan"]["replicas"] >= 1 and data["token_timing"]
    assert data["sweep"]["max_slo_rate"] > 0
    images = check_html(tmp_path / "recipe.html")
    assert len(images) == 4
    # and it opens in a real browser, offline: every embedded plot decodes, no console errors
    from test_observability_server import ARTIFACTS, chromium, run_chromium

    browser, page = chromium(), (tmp_path / "recipe.html").as_uri()
    probe = ("<script>window.onload = () => { const imgs = [...document.images]; document.body.dataset.decoded = "
             "imgs.filter(i => i.complete && i.naturalWidth > 0).length; };</script>")
    (tmp_path / "probe.html").write_text((tmp_path / "recipe.html").read_text().replace("</body>", probe + "</body>"))
    dom = run_chromium(browser, (tmp_path / "probe.html").as_uri(), "--dump-dom")
    assert dom.returncode == 0 and 'data-decoded="4"' in dom.stdout, dom.stdout[:500]
    assert "Capacity plan" in dom.stdout and not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "bench-report.png"
    shot.unlink(missing_ok=True)
    assert run_chromium(browser, page, f"--screenshot={shot}").returncode == 0 and shot.stat().st_size > 20_000
    assert all((tmp_path / name).stat().st_size > 1000 for name in
               ("recipe-latency-throughput.png", "recipe-cdf.png", "recipe-tokens-over-time.png",
                "recipe-token-timing.png", "recipe-requests.csv", "recipe-runs.csv"))


# ---- the in-process engine (no HTTP) ---------------------------------------------------------------------

def test_in_process_engine_matches_offline_greedy_and_reports_errors(llama_dir, llama_llm):
    from tokenmill import SamplingParams
    from tokenmill.bench.client import BenchRequest
    from tokenmill.bench.engine_target import EngineTarget, engine_config_from_args

    config, _ = engine_config_from_args(str(llama_dir), "--num-kv-blocks 256 --max-num-seqs 8")
    target = EngineTarget(config)
    prompts = [[5 + i, 17, 42 + 3 * i, 9] * (i + 1) for i in range(4)]

    async def go():
        await target.open()
        try:
            too_long = [7] * (target.max_model_len + 1)
            requests = [BenchRequest(i, max_tokens=8, input_tokens=len(p), prompt_ids=p)
                        for i, p in enumerate([*prompts, too_long])]
            return await asyncio.gather(*(target.send(r) for r in requests))
        finally:
            target.close()

    results = asyncio.run(go())
    expected = llama_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for (record, reply), want, prompt in zip(results, expected, prompts):
        assert record.ok and reply.token_ids == want.outputs[0].token_ids
        assert record.output_tokens == 8 == sum(k for _, k in record.chunks)
        assert record.input_tokens == len(prompt) and len(record.itls) == 7
        assert 0 < record.ttft <= record.ttlt <= record.e2el
        assert record.tpot == pytest.approx((record.e2el - record.ttft) / 7)
    bad, _ = results[-1]
    assert bad.status == "error" and bad.error_kind == "invalid"
    assert str(target.max_model_len + 1) in bad.error and str(target.max_model_len) in bad.error


def test_cli_in_process_engine(llama_dir, tmp_path):
    assert main(["bench", "concurrency", "2", "--engine-model", str(llama_dir), "--in-process",
                 "--engine-args", "--num-kv-blocks 256", *SMALL, "--workload", "agent",
                 "--result-dir", str(tmp_path), "--result-filename", "x", "--no-plots"]) == 0
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["target"]["server"] == "tokenmill in-process engine" and data["target"]["startup_s"] > 0
    (run,) = data["runs"]
    assert run["summary"]["completed"] == run["summary"]["requests"] >= 4
    assert all(r["output_tokens"] == 8 for r in run["requests"]) and run["source"]["stand_in_outputs"] == 0
    assert main(["bench", "sequential", "--in-process", *SMALL]) == 2      # needs --engine-model
    assert main(["bench", "sequential", "--engine-model", str(llama_dir), "--in-process",
                 "--engine-args=--no-such-flag", *SMALL]) == 2
