"""A real `tokenmill serve` process, driven with the official OpenAI SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tokenmill import SamplingParams
from tokenmill.testing.server_process import ServerProcess

MESSAGES = [{"role": "user", "content": "Say something about tokens."}]


@pytest.fixture(scope="module")
def server(llama_dir):
    proc = ServerProcess(llama_dir, "--num-kv-blocks", "256", "--max-num-seqs", "64",
                         "--max-num-batched-tokens", "256")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def offline(llm, prompt, max_tokens):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0]


# ---- happy paths ----------------------------------------------------------------------------------------

def test_completion_matches_offline_and_reports_usage(client, llama_llm):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    expected = offline(llama_llm, "Once upon a time", 12)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == "length"
    prompt_tokens = len(llama_llm.get_tokenizer().encode("Once upon a time"))
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == prompt_tokens + 12
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model="tiny", prompt="The engine", max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not(client, llama_llm):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    assert full.choices[0].message.role == "assistant"
    expected = llama_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=16))[0]
    assert full.choices[0].message.content == expected.outputs[0].text
    assert full.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stop_strings_and_n_and_logprobs(client, llama_llm):
    text = offline(llama_llm, "The engine", 20).text
    stop = text[6:9]
    out = client.completions.create(model="tiny", prompt="The engine", max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == text[:text.find(stop)] and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The engine", max_tokens=20, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == out.choices[0].text  # held-back text never leaks part of the stop string
    out = client.completions.create(model="tiny", prompt="The engine", max_tokens=8, temperature=1.0, n=3, seed=4,
                                    logprobs=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2] and out.usage.completion_tokens == 24
    lp = out.choices[0].logprobs
    # top_logprobs is keyed by token text (OpenAI format): tokens decoding alike (e.g. partial bytes) merge
    assert len(lp.tokens) == len(lp.token_logprobs) == 8 and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy = most likely


def test_batched_prompts_and_token_ids(client, llama_llm):
    ids = llama_llm.get_tokenizer().encode("abc def")
    out = client.completions.create(model="tiny", prompt=["Once upon a time", "The engine"], max_tokens=6,
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[1].text == offline(llama_llm, "The engine", 6).text
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == offline(llama_llm, "abc def", 6).text


def test_64_concurrent_streams_equal_offline_greedy(server, llama_llm):
    prompts = [f"Request number {i}: the {'quick ' * (i % 7)}brown fox" for i in range(64)]
    expected = [o.outputs[0].text for o in llama_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def one(prompt):
            stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                      stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    assert asyncio.run(run()) == expected


def test_service_endpoints(server, llama_llm):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["max_model_len"] == 1024
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert tokens["tokens"] == llama_llm.get_tokenizer().encode("hello world") and tokens["count"] == len(tokens["tokens"])
    chat_tokens = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": chat_tokens}).json()["prompt"] == \
        "<|im_start|>user\nSay something about tokens.<|im_end|>\n<|im_start|>assistant\n"


def test_metrics_after_load(server, client):
    before = server.metric("generation_tokens_total")
    prompt_before, computed_before = server.metric("prompt_tokens_total"), server.metric("prefill_computed_tokens_total")
    cached_before = server.metric("prefill_cached_tokens_total")
    out = client.completions.create(model="tiny", prompt="count me, a prompt nobody sent before", max_tokens=7,
                                    temperature=0)
    assert server.metric("generation_tokens_total") == before + 7
    assert server.metric("prompt_tokens_total") == prompt_before + out.usage.prompt_tokens
    cached = server.metric("prefill_cached_tokens_total") - cached_before
    assert server.metric("prefill_computed_tokens_total") - computed_before == out.usage.prompt_tokens - cached
    text = httpx.get(server.url + "/metrics").text
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count",
                 "request_prefill_time_seconds_count", "request_decode_time_seconds_count",
                 "prompt_tokens_total", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "num_preemptions_total", 'request_success_total{finished_reason="length"'):
        assert f"tokenmill:{name}" in text, name


# ---- errors ---------------------------------------------------------------------------------------------

def post(server, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize("body, field, fragment", [
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"prompt": "x", "top_p": 2}, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": "x", "max_tokens": -5}, "max_tokens", "max_tokens must be an integer >= 1"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "n": 0}, "n", "n must be an integer >= 1"),
    ({"max_tokens": 3}, "prompt", "prompt: Field required"),
    ({"prompt": "x", "logprobs": 99}, "logprobs", "logprobs must be an integer in [0, 20]"),
])
def test_invalid_parameters_give_400_naming_the_field(server, body, field, fragment):
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == field and error["type"] == "invalid_request_error"


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, field, fragment", [
    ({"max_tokens": 3}, "messages", "messages: Field required"),
    ({"messages": []}, "messages", "messages: List should have at least 1 item"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs", "top_logprobs requires logprobs to be true"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     "message content part of type 'image_url' is not supported"),
    ({"messages": HI, "temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"messages": HI, "max_completion_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
])
def test_chat_invalid_parameters_give_400_naming_the_field(server, body, field, fragment):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == field and error["type"] == "invalid_request_error"


def test_malformed_json(server):
    response = post(server, "/v1/completions", '{"prompt": "x", ', raw=True)
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]


def test_prompt_over_context_limit_names_both_lengths(server):
    response = post(server, "/v1/completions", {"prompt": [5] * 1500, "max_tokens": 1})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "maximum context length is 1024 tokens" in message and "1500 tokens" in message
    response = post(server, "/v1/completions", {"prompt": [5] * 1000, "max_tokens": 100})
    assert response.status_code == 400 and "1100 tokens (1000 in the prompt, 100 in the completion)" in \
        response.json()["error"]["message"]


def test_unknown_model_is_404(server):
    response = post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `gpt-9` does not exist."
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="nope", messages=MESSAGES)


def test_disconnect_mid_stream_frees_blocks(server):
    """A client that disconnects mid-stream: the request is aborted (counted once) and frees its
    blocks. The abort count, not a gauge read mid-stream, proves it was still running when the
    client left: on a 2-core machine a /metrics read can wait behind the stream until all 900
    tokens are done."""
    def aborts() -> float:
        text = httpx.get(server.url + "/metrics").text
        match = re.search(r'^tokenmill:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    before = aborts()
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"prompt": "long one", "max_tokens": 900, "ignore_eos": True, "stream": True,
                               "temperature": 0, "return_token_ids": True}) as r:  # a chunk per token
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        # Leaving the block closes the connection with ~890 tokens still to come.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (server.metric("kv_cache_blocks_used") or
                                           server.metric("num_requests_running") or aborts() == before):
        time.sleep(0.1)
    assert server.metric("kv_cache_blocks_used") == 0 and server.metric("num_requests_running") == 0
    assert aborts() == before + 1


# ---- a second server: no chat template, tight limits, timeouts, shutdown ---------------------------------

@pytest.fixture(scope="module")
def no_template_dir(llama_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(llama_dir, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return target


def test_overload_timeout_and_no_template(no_template_dir):
    server = ServerProcess(no_template_dir, "--num-kv-blocks", "256", "--max-num-seqs", "2",
                           "--max-queued-requests", "2", "--request-timeout", "1.5")
    try:
        response = post(server, "/v1/chat/completions", {"messages": MESSAGES})
        assert response.status_code == 400 and "no chat_template" in response.json()["error"]["message"]

        # 4 long requests fill max_num_seqs (2) + max_queued_requests (2); the 5th gets 503.
        long_body = {"prompt": "busy", "max_tokens": 1000, "ignore_eos": True}
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(server, "/v1/completions", long_body)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while server.metric("num_requests_running") + server.metric("num_requests_waiting") < 4 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        response = post(server, "/v1/completions", {"prompt": "one more", "max_tokens": 2})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "overloaded" in response.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 200  # still responsive
        for t in threads:
            t.join(60)
        # The two queued requests wait for 1000 steps of the running two: past the 1.5 s request
        # timeout they are aborted with 408, not left hanging.
        assert len(results) == 4 and set(r.status_code for r in results) <= {200, 408}
        timed_out = [r for r in results if r.status_code == 408]
        assert len(timed_out) >= 2 and timed_out[0].json()["error"]["message"] == "request timed out"
        assert post(server, "/v1/completions", {"prompt": "after", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(llama_dir):
    server = ServerProcess(llama_dir, "--num-kv-blocks", "256")
    try:
        streamed = []

        def stream_one():
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                              json={"prompt": "last", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as r:
                streamed.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream_one)
        t.start()
        deadline = time.monotonic() + 10
        while server.metric("num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        # It stops accepting at once: a new request is refused while the in-flight stream still runs.
        refused, deadline = None, time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            try:
                httpx.post(server.url + "/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=5)
                time.sleep(0.05)
            except httpx.ConnectError:
                refused = t.is_alive()
        assert refused, "SIGTERM: new connections still accepted, or the in-flight stream ended first"
        t.join(60)
        assert server.proc.wait(60) == 0
        assert streamed and streamed[-1] == "data: [DONE]"
        assert json.loads(streamed[-2][6:])["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()


def test_engine_death_fails_requests_and_health(llama_dir):
    server = ServerProcess(llama_dir, "--num-kv-blocks", "256")
    try:
        result = {}

        def long_request():
            result["response"] = post(server, "/v1/completions",
                                      {"prompt": "doomed", "max_tokens": 1000, "ignore_eos": True})

        def long_stream():
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                              json={"prompt": "doomed too", "max_tokens": 1000, "ignore_eos": True,
                                    "stream": True}) as r:
                result["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        threads = [threading.Thread(target=long_request), threading.Thread(target=long_stream)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while server.metric("num_requests_running") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(server.engine_core_pid(), signal.SIGKILL)
        for t in threads:
            t.join(15)
            assert not t.is_alive(), "in-flight request hung after the engine died"
        response = result["response"]
        assert response.status_code == 500 and "engine" in response.json()["error"]["message"]
        # the stream (already 200) ends with an OpenAI error event carrying the 500, then [DONE]
        error = json.loads(result["stream"][-2][6:])["error"]
        assert error["code"] == 500 and "engine" in error["message"] and result["stream"][-1] == "data: [DONE]"
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "exited" in health.json()["error"]["message"]
        response = post(server, "/v1/completions", {"prompt": "new", "max_tokens": 2})
        assert response.status_code == 500
    finally:
        server.stop()


def test_prefix_cache_usage_and_metrics(server, client):
    prompt = "A long shared system prompt that every turn of the conversation repeats. " * 4
    first = client.completions.create(model="tiny", prompt=prompt + "Q1", max_tokens=2, temperature=0)
    queries, hits = server.metric("prefix_cache_queries_total"), server.metric("prefix_cache_hits_total")
    second = client.completions.create(model="tiny", prompt=prompt + "Q2", max_tokens=2, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert server.metric("prefix_cache_queries_total") == queries + second.usage.prompt_tokens
    assert server.metric("prefix_cache_hits_total") == hits + cached
    salted = post(server, "/v1/completions", {"prompt": prompt + "Q3", "max_tokens": 2, "cache_salt": "tenant-b"})
    assert salted.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # other tenant, no sharing
    assert first.usage.prompt_tokens_details.cached_tokens <= first.usage.prompt_tokens


def test_return_token_ids(server, llama_llm):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    full = post(server, "/v1/completions", body).json()["choices"][0]
    expected = offline(llama_llm, "Once upon a time", 6)
    assert full["token_ids"] == expected.token_ids
    assert full["prompt_token_ids"] == llama_llm.get_tokenizer().encode("Once upon a time")
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected.token_ids


def test_sse_event_stays_one_line_with_unicode_line_separators():
    from tokenmill.server.api_server import _LINE_BREAKS

    text = json.dumps({"text": "a\u2028b\u2029c\x85d"}, ensure_ascii=False).translate(_LINE_BREAKS)
    assert len(text.splitlines()) == 1 and json.loads(text)["text"] == "a\u2028b\u2029c\x85d"


def test_serve_without_model_serves_the_default_model():
    from tokenmill.models.default_model import default_model_dir

    server = ServerProcess(None, "--num-kv-blocks", "128", "--max-model-len", "1024", name=None)
    try:
        (model,) = httpx.get(server.url + "/v1/models").json()["data"]
        assert model["id"] == str(default_model_dir())
        body = {"model": model["id"], "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0}
        assert post(server, "/v1/completions", body).json()["usage"]["completion_tokens"] == 8
        assert f"tokenmill ready: {server.url}/v1" in server.log()   # the URL, printed when ready
    finally:
        server.stop()


def test_no_prefix_caching_flag(llama_dir):
    server = ServerProcess(llama_dir, "--num-kv-blocks", "64", "--no-prefix-caching")
    try:
        body = {"model": "tiny", "prompt": "The same long prompt, sent twice. " * 8, "max_tokens": 2}
        for _ in range(2):
            usage = post(server, "/v1/completions", body).json()["usage"]
            assert usage["prompt_tokens"] > 32 and usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert server.metric("prefix_cache_hits_total") == 0
    finally:
        server.stop()


def test_tokenization_runs_off_the_event_loop():
    """A slow tokenization (here 0.5 s per prompt) must not stall the event loop that streams other
    requests: a ticker on the loop keeps ticking while a batch of prompts is tokenized."""
    import asyncio
    import types

    from tokenmill.engine.async_llm import AsyncLLM

    class SlowTokenizer:
        def encode(self, text, add_special_tokens=True):
            time.sleep(0.5)   # stands in for a huge prompt; a blocking call, as the Rust tokenizer's is
            return [len(text)]

    engine = types.SimpleNamespace(tokenizer=SlowTokenizer())

    async def go():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        ids = [await AsyncLLM.tokenize(engine, "x" * n) for n in (3, 4)]
        task.cancel()
        return ids, max(b - a for a, b in zip(ticks, ticks[1:]))

    ids, longest_gap = asyncio.run(go())
    assert ids == [[3], [4]] and longest_gap < 0.25


def test_disconnect_of_a_non_streaming_request_frees_blocks(server):
    """A client that gives up on a plain (non-SSE) request: the server notices, aborts, frees its blocks."""
    def aborted() -> float:
        lines = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
                 if line.startswith("tokenmill:request_success_total{") and 'finished_reason="abort"' in line]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    aborted_before = aborted()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=httpx.Timeout(5.0, read=0.5),
                   json={"prompt": "long and silent", "max_tokens": 900, "ignore_eos": True, "temperature": 0})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (server.metric("kv_cache_blocks_used") or
                                           server.metric("num_requests_running")):
        time.sleep(0.1)
    assert server.metric("kv_cache_blocks_used") == 0 and server.metric("num_requests_running") == 0
    assert aborted() == aborted_before + 1


def test_request_log_through_the_server_rotates_and_feeds_cache_report(llama_dir, tmp_path):
    from tokenmill.ops.request_log import read_request_log

    log = tmp_path / "requests.jsonl"
    server = ServerProcess(llama_dir, "--num-kv-blocks", "64", "--request-log", str(log),
                           "--request-log-max-bytes", "3000")
    try:
        prompt = "A shared prefix that both turns of this conversation send again. " * 3
        sent = []
        for i in range(6):
            body = {"model": "tiny", "prompt": prompt + f"turn {i}", "max_tokens": 4, "temperature": 0,
                    "return_token_ids": True}
            sent.append(post(server, "/v1/completions", body).json())
    finally:
        assert server.stop() == 0
    files = sorted(tmp_path.glob("requests.jsonl*"))
    assert len(files) >= 2 and all(f.stat().st_size <= 3000 for f in files)   # rotated by size
    records = read_request_log([str(f) for f in sorted(files, reverse=True)])
    by_output = {tuple(r["output_token_ids"]): r for r in records}
    for response in sent:
        choice = response["choices"][0]
        record = by_output[tuple(choice["token_ids"])]
        assert record["prompt_token_ids"] == choice["prompt_token_ids"]
        assert record["num_cached_tokens"] == response["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert sum(r["num_cached_tokens"] for r in records) > 0
    report = subprocess.run([sys.executable, "-m", "tokenmill", "cache-report", *map(str, files),
                             "--capacity-tokens", "1024"], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0 and "achieved (log)" in report.stdout and "Belady" in report.stdout
