"""Outputs of `tokenmill bench`: JSON, CSV, PNG and the self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser

import pytest

from tokenmill.bench.cli import main
from tokenmill.bench.report import load_result
from tokenmill.testing.scripted_server import Script, ScriptedServer


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))


def check_html(path) -> list[dict]:
    parser = Images()
    parser.feed(path.read_text())
    parser.close()
    assert {"html", "head", "body", "table"} <= set(parser.tags)
    for img in parser.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)                       # embedded, nothing to fetch
        assert base64.b64decode(img["src"][len(prefix):])[:8] == b"\x89PNG\r\n\x1a\n"
    return parser.images


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    def script(body, number):   # one request in 12 is cut off, so failures show up in every output
        return Script(ttft=0.01, itl=0.002, tokens=6, fail="cut" if number % 12 == 5 else None)
    with ScriptedServer(script) as server:
        rc = main(["bench", "recipe", "--base-url", server.url, "--workload", "agent", "--length-scale", "0.02",
                   "--output-len", "6", "--num-prompts", "12", "--num-rates", "2", "--goodput", "ttft:500", "--max-error-rate", "0.1",
                   "--target-qps", "5", "--result-dir", str(out), "--result-filename", "r", "--no-progress",
                   "--quiet", "--return-token-ids", "on"])
    assert rc == 0
    return out


def test_recipe_writes_json_csv_png_html(recipe_dir):
    names = sorted(p.name for p in recipe_dir.iterdir())
    assert names == ["r-cdf.png", "r-latency-throughput.png", "r-requests.csv", "r-runs.csv", "r-token-timing.png",
                     "r-tokens-over-time.png", "r.html", "r.json"]
    data = json.loads((recipe_dir / "r.json").read_text())
    assert data["mode"] == "recipe" and data["definitions"]["tpot"].startswith("(E2E - TTFT)")
    assert [r["mode"] for r in data["runs"]][:2] == ["sequential", "burst"]
    total = sum(len(r["requests"]) for r in data["runs"])
    first = data["runs"][0]["requests"][0]
    assert {"ttft", "tpot", "ttlt", "e2el", "status", "error_kind", "chunks", "output_tokens"} <= set(first)
    assert data["plan"]["replicas"] >= 1 and data["token_timing"]["tokens"] == 1000
    kinds = {k for r in data["runs"] for k in r["summary"]["failure_kinds"]}
    assert kinds == {"cut_off"}
    with open(recipe_dir / "r-requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == total and {"incomplete", "ok"} == {r["status"] for r in rows}
    with open(recipe_dir / "r-runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [r["run"] for r in runs] == [r["name"] for r in data["runs"]] and "ttft_p99" in runs[0]
    images = check_html(recipe_dir / "r.html")
    assert {i["alt"] for i in images} == {"latency_throughput", "cdf", "tokens_over_time", "token_timing"}
    html = (recipe_dir / "r.html").read_text()
    assert "Capacity plan" in html and "Token timing" in html and "cut_off" in html


def test_saved_result_loads_and_rerenders(recipe_dir, tmp_path, capsys):
    result = load_result(recipe_dir / "r.json")
    assert result.runs[0].records[0].ttft is not None and result.runs[0].records[0].itls
    assert main(["bench", "report", str(recipe_dir / "r.json"), "--result-dir", str(tmp_path)]) == 0
    check_html(tmp_path / "r.html")
    assert main(["plan", "--from", str(recipe_dir / "r.json"), "--target-qps", "40"]) == 0
    assert "replicas" in capsys.readouterr().out
    assert main(["bench", "timing", "--from", str(recipe_dir / "r.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 1000


def test_workloads_listing(capsys):
    assert main(["bench", "workloads"]) == 0 and "data-processor" in capsys.readouterr().out
    assert main(["bench", "workloads", "agent"]) == 0 and "shared_tokens: 3000" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "sequential", "--workload", "nope", "--quiet"]) == 2
    assert main(["bench", "sequential", "--goodput", "ttft=3", "--quiet"]) == 2
    assert main(["bench", "sequential", "--base-url", "http://127.0.0.1:9", "--quiet"]) == 2
    assert "error" in capsys.readouterr().err
