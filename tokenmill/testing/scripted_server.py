"""A scripted OpenAI-compatible streaming server for testing benchmark clients.

Each request gets a `Script`: time to first token, inter-token latencies, tokens per chunk, and a
failure mode (HTTP 500, an error event, a stream cut off after some chunks, a stream without
[DONE], a short stream, a hang). It speaks raw HTTP/1.1 over asyncio in a background thread.

With a `FakeClock`, time is virtual and exact: before writing each SSE line the server sets the clock
to that line's scripted time and then waits until the client has read the clock once (a client reads
it once per received ``data:`` line), so the client's timestamps equal the script's. Only meaningful
with one request in flight at a time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from tokenmill.testing.server_process import free_port


class FakeClock:
    """A clock the scripted server sets; counts reads so the server can wait for them."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.reads += 1
            return self.now

    def set(self, t: float) -> int:
        with self._lock:
            self.now = t
            return self.reads


@dataclass
class Script:
    ttft: float = 0.05
    itl: float | list[float] = 0.01         # seconds between chunks (one value, or one per gap)
    tokens: int = 10                         # output tokens the stream carries
    tokens_per_chunk: int | list[int] = 1
    fail: str | None = None                  # http_500 | http_503 | error_event | cut | no_done | short | hang
    cut_after: int = 2                       # chunks sent before a cut / error event
    short_by: int = 3                        # tokens missing from a short stream (usage tells the truth)
    send_usage: bool = True                  # honour stream_options.include_usage
    send_token_ids: bool = True              # honour return_token_ids
    done_delay: float = 0.0                  # after the last token chunk until [DONE] (usage in between)
    role_chunk: bool = True                  # chat: a first chunk with the role and no content
    text: str | None = None                  # every chunk's text (default " t<i>" per token)

    def chunk_sizes(self) -> list[int]:
        total = self.tokens - (self.short_by if self.fail == "short" else 0)
        sizes, i = [], 0
        while sum(sizes) < total:
            k = self.tokens_per_chunk if isinstance(self.tokens_per_chunk, int) else \
                self.tokens_per_chunk[min(i, len(self.tokens_per_chunk) - 1)]
            sizes.append(min(k, total - sum(sizes)))
            i += 1
        return sizes

    def gaps(self, n: int) -> list[float]:
        if isinstance(self.itl, (int, float)):
            return [float(self.itl)] * n
        return [float(self.itl[min(i, len(self.itl) - 1)]) for i in range(n)]


@dataclass
class ScriptedServer:
    """``with ScriptedServer(script) as server: ... server.url``. `script` is a Script, or a function
    (request body, request number) -> Script."""
    script: Script | Callable[[dict, int], Script] = field(default_factory=Script)
    clock: FakeClock | None = None
    model: str = "scripted"
    tokenize: bool = True
    max_model_len: int = 100_000

    def __post_init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("scripted server did not start")
        return self

    def __exit__(self, *exc):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # ---- server -------------------------------------------------------------------------------------------

    def _run(self):
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())

    async def _main(self):
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            request_line = (await reader.readline()).decode()
            if not request_line:
                return
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            while True:
                line = (await reader.readline()).decode().strip()
                if not line:
                    break
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            data = json.loads(body) if body else {}
            await self._route(method, path, data, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass

    @staticmethod
    async def _respond(writer, status: int, payload: dict):
        body = json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                     f"connection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def _route(self, method, path, data, writer):
        if method == "GET" and path == "/v1/models":
            return await self._respond(writer, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "owned_by": "scripted", "max_model_len": self.max_model_len}]})
        if path in ("/tokenize", "/detokenize") and not self.tokenize:
            return await self._respond(writer, 404, {"detail": "Not Found"})
        if path == "/tokenize":   # one token per whitespace-separated word: "w17" <-> 17, other words hashed
            words = data.get("prompt", "").split()
            return await self._respond(writer, 200, {"tokens": [_word_id(w) for w in words], "count": len(words)})
        if path == "/detokenize":
            return await self._respond(writer, 200, {"prompt": " ".join(f"w{t}" for t in data["tokens"])})
        if path in ("/v1/completions", "/v1/chat/completions"):
            number = len(self.requests)
            self.requests.append(data)
            script = self.script(data, number) if callable(self.script) else self.script
            return await self._stream(writer, script, data, chat=path.endswith("chat/completions"))
        return await self._respond(writer, 404, {"detail": "Not Found"})

    async def _stream(self, writer, script: Script, data: dict, chat: bool):
        if script.fail in ("http_500", "http_503"):
            status = int(script.fail[5:])
            return await self._respond(writer, status, {"error": {"message": f"scripted {status}", "type": "x",
                                                                  "param": None, "code": status}})
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                     b"connection: close\r\n\r\n")
        await writer.drain()
        if script.fail == "hang":
            await self._stop.wait()
            return
        base = self.clock.now if self.clock else time.perf_counter()
        sizes = script.chunk_sizes()
        gaps = script.gaps(len(sizes))
        want_ids = data.get("return_token_ids") and script.send_token_ids
        times, t = [], base + script.ttft
        for i in range(len(sizes)):
            times.append(t)
            if i + 1 < len(sizes):
                t += gaps[i]
        if chat and script.role_chunk:
            await self._line(writer, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                             None)
        token = 0
        for i, (k, at) in enumerate(zip(sizes, times)):
            if script.fail == "cut" and i == script.cut_after:
                return   # the connection closes mid-body: no terminating chunk, no [DONE]
            if script.fail == "error_event" and i == script.cut_after:
                await self._line(writer, {"error": {"message": "scripted error", "type": "x", "code": 500}}, at)
                await self._line(writer, "[DONE]", at)   # as tokenmill and vLLM do after an error event
                return await self._end(writer)
            ids = list(range(token, token + k))
            token += k
            text = script.text if script.text is not None else "".join(f" t{j}" for j in ids)
            finish = "length" if i == len(sizes) - 1 else None
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text}
            else:
                choice["text"] = text
            if want_ids:
                choice["token_ids"] = ids
            await self._line(writer, {"choices": [choice]}, at)
        end = (times[-1] if times else base) + script.done_delay
        options = data.get("stream_options") or {}
        if options.get("include_usage") and script.send_usage:
            prompt = data.get("prompt") or data.get("messages") or []
            prompt_tokens = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else 7
            usage_tokens = script.tokens if script.fail != "short" else script.tokens - script.short_by
            await self._line(writer, {"choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": usage_tokens,
                "total_tokens": prompt_tokens + usage_tokens, "prompt_tokens_details": {"cached_tokens": 0}}}, end)
        if script.fail != "no_done":
            await self._line(writer, "[DONE]", end)
        await self._end(writer)

    @staticmethod
    async def _end(writer):
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _line(self, writer, payload, at: float | None):
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)  # as tokenmill
        event = f"data: {text}\n\n".encode()
        frame = f"{len(event):x}\r\n".encode() + event + b"\r\n"
        if self.clock is not None:
            reads = self.clock.set(at) if at is not None else self.clock.reads
            writer.write(frame)
            await writer.drain()
            deadline = time.monotonic() + 5
            while self.clock.reads <= reads and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            return
        if at is not None:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        writer.write(frame)
        await writer.drain()


def _word_id(word: str) -> int:
    if word.startswith("w") and word[1:].isdigit():
        return int(word[1:])
    return sum(word.encode()) % 1000 + 1000
