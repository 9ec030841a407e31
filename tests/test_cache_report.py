"""The request log (rotation, what a line holds) and the cache-report simulator on hand-made traces
whose infinite / LRU / Belady hit rates are worked out by hand, plus Belady against brute force."""

from __future__ import annotations

import argparse
import functools
import json
import random

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.ops.cache_report import (TraceRequest, _lookup_hits, add_cache_report_parser, build_accesses,
                                        cache_report, load_trace, simulate_belady, simulate_infinite,
                                        simulate_lru)
from tokenmill.ops.request_log import RequestLog, cache_salt_id, read_request_log

BS = 4
# Block contents (block size 4); a prompt "A B + x" is blocks A, B and one more token, so every
# named block is within the lookup range ((len - 1) // 4 blocks).
A, B, C, D, E = ([10 * k + i for i in range(BS)] for k in range(1, 6))
X = [99]


def trace(*prompts, salts=None, outputs=None) -> list[TraceRequest]:
    return [TraceRequest(list(p), [list(o) for o in (outputs[i] if outputs else [[]])],
                         cache_salt=salts[i] if salts else None, arrival_time=float(i))
            for i, p in enumerate(prompts)]


def rates(t, capacity_blocks):
    """(queries, infinite, LRU, Belady) in tokens."""
    report = cache_report(t, capacity_blocks * BS, BS)
    return report.query_tokens, report.infinite.hit_tokens, report.lru.hit_tokens, report.belady.hit_tokens


def test_cyclic_trace_lru_gets_nothing_belady_keeps_what_is_used_next():
    # A B C A B C, one block each, capacity 2 blocks.
    # infinite: the second A, B, C hit: 3 blocks = 12 tokens of 6 * 5 = 30.
    # LRU: C evicts A, A evicts B, B evicts C, C misses: 0.
    # Belady: at C the cache holds A (next use 3) and B (next use 4); C (next use 5) is the
    #   farthest, so it is not kept; A and B hit, C misses again: 2 blocks = 8 tokens.
    t = trace(A + X, B + X, C + X, A + X, B + X, C + X)
    assert rates(t, 2) == (30, 12, 0, 8)
    assert rates(t, 3) == (30, 12, 12, 12)  # everything fits
    assert rates(t, 0) == (30, 12, 0, 0)


def test_chained_prefixes_lru_evicts_what_belady_keeps():
    # r0 = A B C x, r1 = D E x, r2 = A B x, r3 = D E x; capacity 3 blocks. Queries 13 + 9 + 9 + 9 = 40.
    # infinite: r2 hits A B, r3 hits D E: 4 blocks = 16.
    # LRU (a request's blocks used tail first): after r0 the order is C, B, A (A most recent);
    #   r1 inserts E (evicts C), D (evicts B): A, E, D. r2 hits A, misses B; inserts B (evicts A),
    #   A (evicts E): D, B, A. r3 hits D, misses E. 2 blocks = 8.
    # Belady: after r0 next uses are A 2, B 2, C never. r1: D (next 3) evicts C; E (next 3, deeper
    #   than D) ties with D and is not kept. r2 hits A B, r3 hits D, misses E: 3 blocks = 12.
    t = trace(A + B + C + X, D + E + X, A + B + X, D + E + X)
    assert rates(t, 3) == (40, 16, 8, 12)


def test_last_token_is_never_a_hit():
    # r0 = A B (8 tokens, block-aligned): lookup range (8 - 1) // 4 = 1 block; computes both.
    # r1 = A B x: range 2, hits A B = 8. r2 = A B: range 1, hits A = 4. Queries 8 + 9 + 8 = 25.
    t = trace(A + B, A + B + X, A + B)
    assert rates(t, 10) == (25, 12, 12, 12)
    assert rates(t, 1) == (25, 4 + 8, 4 + 4, 4 + 4)  # one block: only A can stay


def test_salts_and_block_identity_by_prefix():
    # Same tokens under salts s1, s2, s1, none: only the third hits (4 of 20).
    assert rates(trace(A + X, A + X, A + X, A + X, salts=["s1", "s2", "s1", None]), 10) == (20, 4, 4, 4)
    # Block B after A is not block B after C: C B x after A B x hits nothing.
    assert rates(trace(A + B + X, C + B + X), 10) == (18, 0, 0, 0)


def test_generated_blocks_are_cached_for_the_next_turn():
    # r0 = A t (5 tokens) generating o1..o4: computes 5 + 4 - 1 = 8 tokens, blocks A and (t o1 o2 o3).
    # r1 = A t o1 o2 o3 o4 y z (11 tokens): range 10 // 4 = 2 blocks, both hit = 8 of 5 + 11.
    t = trace(A + [1], A + [1, 2, 3, 4, 5, 6, 7], outputs=[[[2, 3, 4, 5]], [[]]])
    assert rates(t, 10) == (16, 8, 8, 8)
    # n = 2: the second sequence's blocks are cached too.
    t = trace(A + [1], A + [1, 6, 7, 8, 9], outputs=[[[2, 3, 4, 5], [6, 7, 8, 9]], [[]]])
    assert rates(t, 10) == (14, 8, 8, 8)


def brute_force_best(accesses, capacity: int) -> int:
    """Most hit blocks any eviction policy gets: tries every choice (evict any cached block, or
    do not keep the new one) at every insertion."""

    @functools.lru_cache(maxsize=None)
    def best(r: int, j: int, cache: frozenset) -> int:
        if r == len(accesses):
            return 0
        a = accesses[r]
        if j < 0:
            return _lookup_hits(a.lookup, cache) + best(r, 0, cache)
        if j == len(a.insert):
            return best(r + 1, -1, cache)
        key = a.insert[j]
        if key in cache:
            return best(r, j + 1, cache)
        options = [best(r, j + 1, cache)]
        if len(cache) < capacity:
            options.append(best(r, j + 1, cache | {key}))
        elif capacity:
            options += [best(r, j + 1, (cache - {victim}) | {key}) for victim in cache]
        return max(options)

    return best(0, -1, frozenset())


@pytest.mark.parametrize("seed", range(40))
def test_belady_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2])
    reqs = []
    for i in range(rng.randrange(4, 8)):
        prompt = [rng.choice([1, 2, 3]) for _ in range(rng.randrange(2, 6))]
        output = [rng.choice([1, 2, 3]) for _ in range(rng.randrange(0, 3))]
        reqs.append(TraceRequest(prompt, [output], cache_salt=rng.choice([None, None, "s"]), arrival_time=i))
    accesses = build_accesses(reqs, bs)
    for capacity in range(0, 5):
        opt = sum(simulate_belady(accesses, capacity))
        assert opt == brute_force_best(accesses, capacity), (seed, capacity)
        assert sum(simulate_lru(accesses, capacity)) <= opt <= sum(simulate_infinite(accesses))


# ---- the request log --------------------------------------------------------------------------------

def write(log: RequestLog, i: int, prompt=(1, 2, 3), cached=0, salt=None):
    log.log(request_id=str(i), prompt_token_ids=list(prompt), output_token_ids=[4, 5], num_cached_tokens=cached,
            arrival_time=100.0 + i, first_token_time=100.5 + i, finish_time=101.0 + i, finish_reason="length",
            cache_salt=salt)


def test_request_log_rotates_by_size(tmp_path):
    path = tmp_path / "requests.jsonl"
    probe = RequestLog(tmp_path / "probe.jsonl")
    write(probe, 0)
    probe.close()
    line_bytes = (tmp_path / "probe.jsonl").stat().st_size
    log = RequestLog(path, max_bytes=3 * line_bytes, backup_count=2)
    for i in range(10):
        write(log, i)
    log.close()
    # 3 lines per file: 0-2 went beyond the 2 backups, 3-5 are in .2, 6-8 in .1, 9 in the current file.
    files = [path, tmp_path / "requests.jsonl.1", tmp_path / "requests.jsonl.2"]
    assert [len(p.read_text().splitlines()) for p in files] == [1, 3, 3]
    assert not (tmp_path / "requests.jsonl.3").exists()
    assert all(p.stat().st_size <= 3 * line_bytes for p in files)
    assert [r["request_id"] for r in read_request_log(files)] == [str(i) for i in range(3, 10)]
    # Reopening appends to the current file.
    log = RequestLog(path, max_bytes=3 * line_bytes, backup_count=2)
    write(log, 10)
    log.close()
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["9", "10"]


def test_request_log_without_backups_and_oversized_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    log = RequestLog(path, max_bytes=50, backup_count=0)  # every line is larger than 50 bytes
    for i in range(3):
        write(log, i)
    log.close()
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["2"]
    assert list(tmp_path.iterdir()) == [path]


def test_request_log_line(tmp_path):
    path = tmp_path / "r.jsonl"
    log = RequestLog(path)
    write(log, 0, prompt=[7, 8, 9], cached=0, salt="secret")
    log.close()
    record = json.loads(path.read_text())
    assert record == {"request_id": "0", "arrival_time": 100.0, "first_token_time": 100.5, "finish_time": 101.0,
                      "finish_reason": "length", "num_prompt_tokens": 3, "num_cached_tokens": 0,
                      "cache_salt_id": cache_salt_id("secret"), "prompt_token_ids": [7, 8, 9],
                      "output_token_ids": [4, 5]}
    assert "secret" not in path.read_text()


def test_engine_writes_the_log_and_the_report_reads_it(llama_dir, tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    llm = LLM(str(llama_dir), num_kv_blocks=64, request_log_path=str(path))
    engine = llm.llm_engine
    prompt = list(range(100, 150))  # 3 blocks + 2
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    second = llm.generate([prompt], params)[0]
    engine.add_request("salted", prompt, params, cache_salt="t")
    engine.add_request("gone", prompt + [5], params)
    engine.step()
    engine.abort_request("gone")
    while engine.has_unfinished_requests():
        engine.step()
    records = read_request_log([path])
    assert [r["request_id"] for r in records] == [first.request_id, second.request_id, "salted", "gone"]
    r0, r1, salted, gone = records
    assert r0["prompt_token_ids"] == prompt and r0["output_token_ids"] == first.outputs[0].token_ids
    assert (r0["num_cached_tokens"], r1["num_cached_tokens"], salted["num_cached_tokens"]) == (0, 48, 0)
    assert r1["num_cached_tokens"] == second.num_cached_tokens
    assert r0["arrival_time"] <= r0["first_token_time"] <= r0["finish_time"] <= r1["arrival_time"]
    # generate() requests are FINAL_ONLY: the first token's time still comes from its own step.
    assert r0["first_token_time"] < r0["finish_time"]
    assert salted["cache_salt_id"] == cache_salt_id("t") and r0["cache_salt_id"] is None
    assert gone["finish_reason"] == "abort" and r0["finish_reason"] == "length"

    # The report: the engine hit what an infinite cache would: 48 for r1 and 48 for "gone" (51
    # tokens, r0's 3 blocks); "salted" is another tenant.
    parser = argparse.ArgumentParser()
    add_cache_report_parser(parser.add_subparsers())
    args = parser.parse_args(["cache-report", str(path), "--capacity-tokens", "1024"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    report = cache_report(load_trace([str(path)]), 1024)
    assert report.query_tokens == 50 * 3 + 51
    assert report.achieved.hit_tokens == report.infinite.hit_tokens == report.belady.hit_tokens == 48 + 48
    assert report.gap_tokens == 0
    assert "4 requests, 201 prompt tokens" in text and "achieved (log)" in text and "Belady" in text


def test_report_gap_in_tokens_per_second(tmp_path, capsys):
    # The cyclic trace at capacity 2 blocks: Belady 8 hit tokens, the engine reported 0, over a log
    # from the first arrival (t=100) to the last finish (t=120): 8 / 20 = 0.4 tokens/s.
    path = tmp_path / "r.jsonl"
    log = RequestLog(path)
    for i, p in enumerate([A + X, B + X, C + X, A + X, B + X, C + X]):
        log.log(request_id=str(i), prompt_token_ids=p, output_token_ids=[], num_cached_tokens=0,
                arrival_time=100.0 + i, first_token_time=None, finish_time=120.0 if i == 5 else 101.0 + i)
    log.close()
    report = cache_report(load_trace([str(path)]), capacity_tokens=8, block_size=BS)
    assert (report.achieved.hit_tokens, report.lru.hit_tokens, report.belady.hit_tokens,
            report.infinite.hit_tokens) == (0, 0, 8, 12)
    assert report.duration_s == 20.0 and report.gap_tokens == 8 and report.gap_tokens_per_s == pytest.approx(0.4)
    parser = argparse.ArgumentParser()
    add_cache_report_parser(parser.add_subparsers())
    args = parser.parse_args(["cache-report", str(path), "--capacity-tokens", "8", "--block-size", "4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "0.4 prefill tokens/s" in out and "26.7%" in out  # Belady: 8 / 30
    # Without a capacity only the infinite cache is simulated and the gap is measured against it.
    args = parser.parse_args(["cache-report", str(path), "--block-size", "4"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "LRU" not in out and "0.6 prefill tokens/s" in out
