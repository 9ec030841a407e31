"""Async streaming client for OpenAI-compatible servers (tokenmill, vLLM, SGLang): completions and chat,
``stream_options.include_usage``, and ``return_token_ids`` where the target supports it (tokenmill), so
chunks carry exact token counts and multi-turn conversations can resend exact token ids."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from tokenmill.bench.metrics import RequestRecord, finalize

Clock = Callable[[], float]


@dataclass
class Target:
    base_url: str
    model: str | None = None
    api_key: str | None = None
    headers: dict = field(default_factory=dict)
    server: str = "unknown"                 # tokenmill | unknown (from /v1/models owned_by)
    max_model_len: int | None = None
    can_tokenize: bool = False              # POST /tokenize and /detokenize answer
    return_token_ids: bool = False

    def __post_init__(self):
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]

    def request_headers(self) -> dict:
        headers = dict(self.headers)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def to_dict(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "server": self.server,
                "max_model_len": self.max_model_len, "can_tokenize": self.can_tokenize,
                "return_token_ids": self.return_token_ids}


@dataclass
class BenchRequest:
    """One request to send. Exactly one of prompt_ids, prompt_text, messages is set."""
    index: int
    max_tokens: int
    input_tokens: int                        # prompt tokens as built (exact for ids)
    prompt_ids: list[int] | None = None
    prompt_text: str | None = None
    messages: list[dict] | None = None
    conversation: int = 0
    turn: int = 0
    scheduled_s: float = 0.0


@dataclass
class Reply:
    """What a finished request produced (for the next turn of a conversation)."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    prompt_tokens: int | None = None          # the server's usage.prompt_tokens


def make_http_client(concurrency: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)), limits=limits)


async def discover(http: httpx.AsyncClient, target: Target, return_token_ids: str = "auto") -> Target:
    """Fill in model, server kind, max_model_len and /tokenize support from the target itself."""
    headers = target.request_headers()
    response = await http.get(target.base_url + "/v1/models", headers=headers)
    response.raise_for_status()
    models = response.json().get("data", [])
    entry = next((m for m in models if m.get("id") == target.model), models[0] if models else {})
    if target.model is None:
        if not models:
            raise ValueError(f"{target.base_url}/v1/models lists no model; pass --model")
        target.model = entry["id"]
    target.server = "tokenmill" if entry.get("owned_by") == "tokenmill" else (entry.get("owned_by") or "unknown")
    target.max_model_len = entry.get("max_model_len") or target.max_model_len
    try:
        probe = await http.post(target.base_url + "/tokenize", headers=headers,
                                json={"model": target.model, "prompt": "hello world", "add_special_tokens": False})
        detok = await http.post(target.base_url + "/detokenize", headers=headers,
                                json={"model": target.model, "tokens": probe.json().get("tokens", [])}) \
            if probe.status_code == 200 else None
        target.can_tokenize = probe.status_code == 200 and detok is not None and detok.status_code == 200
    except (httpx.HTTPError, ValueError):
        target.can_tokenize = False
    target.return_token_ids = {"on": True, "off": False}.get(return_token_ids, target.server == "tokenmill")
    return target


def request_body(target: Target, request: BenchRequest, temperature: float, ignore_eos: bool) -> tuple[str, dict]:
    body: dict = {"model": target.model, "max_tokens": request.max_tokens, "temperature": temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if target.return_token_ids:
        body["return_token_ids"] = True
    if request.messages is not None:
        body["messages"] = request.messages
        return "/v1/chat/completions", body
    body["prompt"] = request.prompt_ids if request.prompt_ids is not None else request.prompt_text
    return "/v1/completions", body


class StreamState:
    """Consumes one SSE stream's data payloads with their arrival times (pure: no I/O, no clock)."""

    def __init__(self, record: RequestRecord):
        self.record = record
        self.reply = Reply()
        self.done = False
        self.exact_counts = True
        self.usage_tokens: int | None = None
        self.counted = 0

    def feed(self, t: float, payload: str) -> None:
        if payload == "[DONE]":
            self.done = True
            self.record.e2el = t
            return
        event = json.loads(payload)
        if "error" in event and not event.get("choices"):
            error = event["error"]
            self.record.status, self.record.error_kind = "error", "error_event"
            self.record.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            return
        usage = event.get("usage")
        if usage:
            self.usage_tokens = usage.get("completion_tokens")
            if usage.get("prompt_tokens") is not None:
                self.record.input_tokens = self.reply.prompt_tokens = usage["prompt_tokens"]
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                self.record.cached_tokens = details["cached_tokens"]
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or "") if delta \
                else choice.get("text") or ""
            ids = choice.get("token_ids")
            if ids is not None:
                k = len(ids)
                self.reply.token_ids.extend(ids)
            else:
                k = 1 if text else 0
                if text:
                    self.exact_counts = False
            if choice.get("prompt_token_ids") is not None:
                self.reply.prompt_token_ids = list(choice["prompt_token_ids"])
            self.reply.text += text
            if choice.get("finish_reason"):
                self.record.finish_reason = choice["finish_reason"]
            if k:
                self.counted += k
                self.record.chunks.append((t, k))


async def sse_lines(response: httpx.Response):
    """Lines of an SSE body, split on LF (CRLF) only. Not httpx's aiter_lines: it splits on every
    str.splitlines() boundary, and JSON written with ensure_ascii=False may carry U+2028, U+2029 or
    U+0085 raw inside a string (tokenmill's and vLLM's servers do), which would cut an event in two."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", errors="replace")


async def send(http: httpx.AsyncClient, target: Target, request: BenchRequest, *, temperature: float = 0.0,
               ignore_eos: bool = True, timeout: float = 600.0, clock: Clock = time.perf_counter,
               run_start: float = 0.0) -> tuple[RequestRecord, Reply]:
    """Send one streaming request and measure it. Never raises for server or network failures: they
    become the record's status (error / timeout / incomplete) and error_kind."""
    record = RequestRecord(index=request.index, conversation=request.conversation, turn=request.turn,
                           scheduled_s=request.scheduled_s, input_tokens=request.input_tokens,
                           max_tokens=request.max_tokens)
    path, body = request_body(target, request, temperature, ignore_eos)
    state = StreamState(record)
    start = clock()
    record.send_s = start - run_start

    async def consume():
        async with http.stream("POST", target.base_url + path, json=body, headers=target.request_headers()) as resp:
            record.http_status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text[:300]
                record.status, record.error_kind, record.error = "error", f"http_{resp.status_code}", message
                return
            async for line in sse_lines(resp):
                if not line.startswith("data:"):
                    continue   # blank separators, comments (": keep-alive"), event: lines
                now = clock()
                state.feed(now - start, line[5:].strip())
                if state.done or record.status != "ok":
                    break

    try:
        await asyncio.wait_for(consume(), timeout)
    except asyncio.TimeoutError:
        record.status, record.error_kind = "timeout", "timeout"
        record.error = f"no complete response within {timeout:g} s"
    except httpx.ConnectError as e:
        record.status, record.error_kind, record.error = "error", "connection", f"{type(e).__name__}: {e}"
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        record.status, record.error_kind = "incomplete", "cut_off"
        record.error = f"stream cut off: {type(e).__name__}: {e}"
    except httpx.TimeoutException as e:
        record.status, record.error_kind, record.error = "timeout", "timeout", f"{type(e).__name__}: {e}"
    except httpx.HTTPError as e:
        record.status, record.error_kind, record.error = "error", "http", f"{type(e).__name__}: {e}"
    except (ValueError, KeyError, TypeError) as e:
        record.status, record.error_kind, record.error = "error", "bad_response", f"{type(e).__name__}: {e}"
    record.end_s = clock() - run_start
    if record.status == "ok" and not state.done:
        record.status, record.error_kind = "incomplete", "no_done"
        record.error = "the stream ended without data: [DONE]"
    record.output_tokens = state.usage_tokens if state.usage_tokens is not None else state.counted
    finalize(record, state.exact_counts, ignore_eos)
    return record, state.reply
