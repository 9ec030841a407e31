"""Streaming load helpers shared by the benchmark scripts (until `tokenmill bench` replaces them)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One greedy streaming completion of exactly max_tokens tokens; TTFT, TPOT, E2E, largest gap,
    the generated token ids and the cached prompt tokens the server reported."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    start = time.perf_counter()
    stamps, tokens, error, token_ids, cached = [], 0, None, [], 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                    cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
                elif event["choices"]:
                    stamps.append(time.perf_counter())
                    token_ids.extend(event["choices"][0].get("token_ids", []))
    except httpx.HTTPError as e:
        error = repr(e)
    end = time.perf_counter()
    if error or not stamps or tokens != max_tokens:
        return {"ok": False, "error": error or f"incomplete: {tokens}/{max_tokens} tokens"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ok": True, "ttft": stamps[0] - start, "e2e": end - start, "tokens": tokens,
            "tpot": (end - stamps[0]) / max(1, tokens - 1), "max_gap": max(gaps, default=0.0),
            "token_ids": token_ids, "cached_tokens": cached}


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    out = {"requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
           "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], "wall_s": wall,
           "output_tok_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0}
    for key in ("ttft", "tpot", "e2e", "max_gap"):
        values = [r[key] for r in ok]
        out[key] = {"mean": sum(values) / len(values) if values else float("nan"), "p50": pct(values, 0.5),
                    "p99": pct(values, 0.99)}
    return out


async def run_load(url: str, prompts: list[list[int]], max_tokens: int, concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, url, p, max_tokens) for p in prompts))
        else:
            results = [await one_request(client, url, p, max_tokens) for p in prompts]
        return summarize(list(results), time.perf_counter() - start)


