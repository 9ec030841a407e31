"""OpenAI-compatible HTTP server (FastAPI). The engine core runs in its own process (AsyncLLM)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from tokenmill import __version__
from tokenmill.engine.async_llm import AsyncLLM, OverloadedError, RequestStream, request_timing, timing_header
from tokenmill.engine.core_process import EngineDeadError
from tokenmill.errors import InvalidRequestError
from tokenmill.ops.tracing import new_request_id, request_id_var, sanitize_request_id
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest, error_body, message_text)

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
TIMING_HEADER = "X-Tokenmill-Timing"


class RequestIdMiddleware:
    """Every HTTP request gets a trace id: the client's X-Request-Id (made safe) or `req-<uuid>`.
    It is set in `request_id_var` (so log lines name it), kept in `scope["state"]`, and returned
    as the response's X-Request-Id header. Plain ASGI, so streaming responses pass untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                given = sanitize_request_id(value.decode("latin-1"))
                break
        hex_id = uuid.uuid4().hex
        trace_id = given or new_request_id(hex_id)
        state = scope.setdefault("state", {})
        state["trace_id"], state["uuid_hex"] = trace_id, hex_id
        header = (b"x-request-id", trace_id.encode("latin-1"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = request_id_var.set(trace_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def _ids(raw: Request, prefix: str) -> tuple[str, str]:
    """(engine/response id `prefix-<uuid>`, trace id) of the HTTP request being served."""
    trace_id = raw.scope.get("state", {}).get("trace_id") or request_id_var.get()
    hex_id = raw.scope.get("state", {}).get("uuid_hex") or uuid.uuid4().hex
    return f"{prefix}-{hex_id}", trace_id or new_request_id(hex_id)


def timing_headers(timing: dict) -> dict:
    server_timing = ", ".join(f"{name};dur={timing[f'{name}_ms']}" for name in ("queue", "prefill", "decode",
                                                                               "detokenize", "e2e")
                              if timing.get(f"{name}_ms") is not None)
    return {TIMING_HEADER: timing_header(timing), "Server-Timing": server_timing}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error_response(status: int, message: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, status, param), status_code=status, headers=headers)


def _engine_error(e: Exception) -> APIError:
    """Map engine exceptions to HTTP errors (OpenAI's shapes)."""
    if isinstance(e, InvalidRequestError):
        return APIError(400, e.message, "invalid_request_error", e.param)
    if isinstance(e, OverloadedError):
        return APIError(503, f"{e}; retry after {RETRY_AFTER_SECONDS} s", "service_unavailable",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(e, EngineDeadError):
        return APIError(500, f"engine error: {e}", "internal_server_error")
    if isinstance(e, asyncio.TimeoutError):
        return APIError(408, "request timed out", "timeout")
    raise e


@dataclass
class PreparedPrompt:
    text: str | None
    token_ids: list[int]


@dataclass
class ServerState:
    engine: AsyncLLM
    model_name: str
    request_timeout: float | None


def build_app(engine: AsyncLLM, model_name: str, request_timeout: float | None = None) -> FastAPI:
    """The FastAPI application over a started-or-to-be-started AsyncLLM."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        sampler = asyncio.create_task(_sample_live_stats(engine)) if engine.metrics is not None else None
        try:
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)
    state = ServerState(engine, model_name, request_timeout)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _error_response(400, f"malformed JSON body: {first.get('msg', '')}", "invalid_request_error")
        message = f"{field}: {first.get('msg', 'invalid value')}" if field else first.get("msg", "invalid request")
        return _error_response(400, message, "invalid_request_error", field)

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != state.model_name:
            raise APIError(404, f"The model `{requested}` does not exist.", "not_found_error", "model")

    # ---- service endpoints ------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return _error_response(503, f"engine unhealthy: {engine.client.death_reason}", "service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "tokenmill",
            "root": engine.config.model, "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/stats")
    async def stats(seconds: float | None = None):
        return _stats_body(engine, state.model_name, seconds)

    @app.get("/dashboard")
    async def dashboard():
        from tokenmill.server.dashboard import dashboard_html

        return HTMLResponse(dashboard_html(state.model_name))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            text = _render_chat(engine, body.messages, body.add_generation_prompt)
            tokens = await engine.tokenize(text, add_special_tokens=False)
        else:
            tokens = await engine.tokenize(body.prompt, body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        vocab = engine.model_config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range for the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # ---- generation ------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        prompts = await _completion_prompts(engine, body.prompt)
        request_id, trace_id = _ids(raw, "cmpl")
        streams, params = _submit_all(engine, state, request_id, prompts, body,
                                      lambda p: body.max_tokens, body.logprobs, trace_id)
        usage_wanted = body.stream_options is not None and body.stream_options.include_usage
        render = CompletionRenderer(engine, state.model_name, request_id, prompts, body.echo, body.n,
                                    body.return_token_ids, streams)
        if body.stream:
            return _sse(render.stream(_merged(engine, streams, state.request_timeout), params, usage_wanted))
        return await _until_disconnect(raw, render.full(_merged(engine, streams, state.request_timeout)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        text = _render_chat(engine, body.messages, body.add_generation_prompt)
        prompts = [PreparedPrompt(text, await engine.tokenize(text, add_special_tokens=False))]
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        request_id, trace_id = _ids(raw, "chatcmpl")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        streams, params = _submit_all(engine, state, request_id, prompts, body, lambda p: max_tokens,
                                      (body.top_logprobs or 0) if body.logprobs else None, trace_id)
        usage_wanted = body.stream_options is not None and body.stream_options.include_usage
        render = ChatRenderer(engine, state.model_name, request_id, prompts, False, body.n, body.return_token_ids,
                              streams)
        if body.stream:
            return _sse(render.stream(_merged(engine, streams, state.request_timeout), params, usage_wanted))
        return await _until_disconnect(raw, render.full(_merged(engine, streams, state.request_timeout)))

    return app


async def _sample_live_stats(engine: AsyncLLM) -> None:
    """One dashboard point per interval (and the busy-fraction gauge, the underfed-GPU check)."""
    live = engine.metrics.live
    while True:
        await asyncio.sleep(live.interval)
        try:
            engine.metrics.sample_live()
        except Exception:
            logger.exception("live stats sample failed")


def _stats_body(engine: AsyncLLM, model_name: str, seconds: float | None) -> dict:
    metrics = engine.metrics
    live = metrics.live if metrics is not None else None
    telemetry = live.telemetry if live is not None else None
    gpus = {}
    telemetry_info = None
    if telemetry is not None:
        gpus = {str(i): {"name": telemetry.names.get(i, ""), **v} for i, v in telemetry.latest.items()}
        n = max(1, telemetry.samples)
        telemetry_info = {"interval_s": telemetry.interval, "samples": telemetry.samples,
                          "last_sample_ms": round(telemetry.last_sample_seconds * 1e3, 4),
                          "mean_sample_ms": round(telemetry.sample_seconds_total / n * 1e3, 4),
                          "mean_sample_cpu_ms": round(telemetry.sample_cpu_seconds_total / n * 1e3, 4)}
    return {
        "model": model_name, "time": time.time(), "healthy": engine.healthy,
        "interval_s": live.interval if live else None,
        "history_s": live.points.maxlen * live.interval if live else None,
        "window_s": live.window_n * live.interval if live else None,
        "max_model_len": engine.max_model_len, "kv_capacity_tokens": engine.kv_capacity_tokens,
        "device_timing": live.device_timing if live else "", "gpu_busy_fraction": live.busy_fraction if live else None,
        "gpus": gpus, "telemetry": telemetry_info, "warnings": live.warnings[-10:] if live else [],
        "series": live.series(seconds) if live else {},
    }


# ---- request preparation -----------------------------------------------------------------------------

def _render_chat(engine: AsyncLLM, messages, add_generation_prompt: bool) -> str:
    try:
        conversation = [{"role": m.role, "content": message_text(m)} for m in messages]
        return engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None


async def _completion_prompts(engine: AsyncLLM, prompt) -> list[PreparedPrompt]:
    if isinstance(prompt, str):
        return [PreparedPrompt(prompt, await engine.tokenize(prompt))]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [PreparedPrompt(None, list(prompt))]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    prepared = []
    for item in prompt:
        if isinstance(item, str):
            prepared.append(PreparedPrompt(item, await engine.tokenize(item)))
        else:
            prepared.append(PreparedPrompt(None, list(item)))
    return prepared


def _submit_all(engine: AsyncLLM, state: ServerState, request_id: str, prompts: list[PreparedPrompt], body,
                max_tokens_for, logprobs, trace_id: str | None = None) -> tuple[list[RequestStream], SamplingParams]:
    """Validate every prompt, then submit all (one engine request per prompt). All or nothing."""
    checked = []
    for index, prompt in enumerate(prompts):
        num = len(prompt.token_ids)
        max_tokens = max_tokens_for(prompt)
        if max_tokens is None:
            max_tokens = max(1, engine.max_model_len - num)
        elif num <= engine.max_model_len and num + max_tokens > engine.max_model_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. However, "
                                f"you requested {num + max_tokens} tokens ({num} in the prompt, {max_tokens} in the "
                                f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
        try:
            params = body.sampling_params(max_tokens, logprobs, engine.generation_defaults)
            engine.validate(prompt.token_ids, params)
        except InvalidRequestError as e:
            raise _engine_error(e) from None
        checked.append(params)
    streams = []
    try:
        for index, (prompt, params) in enumerate(zip(prompts, checked)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{index}"
            streams.append(engine.submit(rid, prompt.text, prompt.token_ids, params, cache_salt=body.cache_salt,
                                         trace_id=trace_id))
    except Exception as e:
        for stream in streams:
            engine.abort(stream.request_id)
        raise _engine_error(e) from None
    return streams, checked[0]


async def _merged(engine: AsyncLLM, streams: list[RequestStream], timeout) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, cumulative output) from all of a call's requests as they change."""
    if len(streams) == 1:
        async for output in engine.outputs(streams[0], timeout):
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for output in engine.outputs(stream, timeout):
                await queue.put((index, output, None))
        except BaseException as e:  # handed to the consumer, which re-raises
            await queue.put((index, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output.finished:
                remaining -= 1
            yield index, output
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnect(raw: Request, work) -> JSONResponse | Response:
    """Run a non-streaming request; if the client goes away first, cancel it (which aborts it)."""
    task = asyncio.create_task(work)

    async def watch():
        while not await raw.is_disconnected():
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)


# Characters that many line readers (Python's str.splitlines, httpx's aiter_lines) treat as line
# breaks: escaped so one SSE event always stays one line. Inside JSON they only occur in strings.
# (json.dumps already escapes the C0 controls.)
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


# ---- rendering -----------------------------------------------------------------------------------------

def _top_entries(entry: dict, token_id: int) -> list:
    """The top-N of a position's logprob dict, most likely first. The dict also holds the sampled
    token; when it is outside the top-N (its rank breaks the run 1..N) it is not one of them."""
    ranked = sorted(entry.values(), key=lambda lp: lp.rank)
    if [lp.rank for lp in ranked] == list(range(1, len(ranked) + 1)):
        return ranked
    return [lp for tid, lp in entry.items() if tid != token_id]


class CompletionRenderer:
    """Turns cumulative outputs into OpenAI response objects (full or as stream chunks)."""

    object_full = "text_completion"
    object_chunk = "text_completion"

    def __init__(self, engine: AsyncLLM, model_name: str, request_id: str, prompts: list[PreparedPrompt],
                 echo: bool, n: int, return_token_ids: bool = False, streams: list[RequestStream] | None = None):
        self.engine, self.model_name, self.request_id = engine, model_name, request_id
        self.prompts, self.echo, self.n, self.return_token_ids = prompts, echo, n, return_token_ids
        self.streams = streams or []
        self.created = int(time.time())

    def timing(self) -> dict | None:
        return request_timing(self.streams) if self.streams else None

    def choice_index(self, prompt_index: int, seq_index: int) -> int:
        return prompt_index * self.n + seq_index

    def usage(self, finals: dict[int, RequestOutput]) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
        cached = sum(out.num_cached_tokens for out in finals.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def envelope(self, choices: list[dict], chunk: bool) -> dict:
        return {"id": self.request_id, "object": self.object_chunk if chunk else self.object_full,
                "created": self.created, "model": self.model_name, "choices": choices}

    # completions specifics
    def full_choice(self, prompt_index: int, c: CompletionOutput) -> dict:
        prefix = (self.prompts[prompt_index].text or "") if self.echo else ""
        return {"index": self.choice_index(prompt_index, c.index), "text": prefix + c.text,
                "logprobs": self.logprobs(c, 0, len(c.token_ids), len(prefix)), "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    def delta_choice(self, index: int, text: str, c: CompletionOutput, start: int, end: int, offset: int,
                     first: bool, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(c, start, end, offset),
                "finish_reason": finish, "stop_reason": c.stop_reason if finish else None}

    def logprobs(self, c: CompletionOutput, start: int, end: int, offset: int) -> dict | None:
        if c.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, entry in zip(c.token_ids[start:end], c.logprobs[start:end]):
            text = entry[token_id].decoded_token or ""
            tokens.append(text)
            token_logprobs.append(entry[token_id].logprob)
            top.append({lp.decoded_token: lp.logprob for lp in _top_entries(entry, token_id)})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    async def full(self, merged: AsyncIterator[tuple[int, RequestOutput]]) -> JSONResponse:
        finals: dict[int, RequestOutput] = {}
        try:
            async for index, output in merged:
                if output.finished:
                    finals[index] = output
        except Exception as e:
            api_error = _engine_error(e)
            return _error_response(api_error.status, api_error.message, api_error.type, api_error.param,
                                   api_error.headers)
        choices = []
        for i, out in finals.items():
            for c in out.outputs:
                choice = self.full_choice(i, c)
                if self.return_token_ids:
                    choice["token_ids"] = list(c.token_ids)
                    choice["prompt_token_ids"] = self.prompts[i].token_ids
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        body = self.envelope(choices, chunk=False)
        body["usage"] = self.usage(finals)
        timing = self.timing()
        return JSONResponse(body, headers=timing_headers(timing) if timing else None)

    async def stream(self, merged, params: SamplingParams, include_usage: bool) -> AsyncIterator[dict]:
        # Hold back text that could be the start of a stop string: it may yet be cut.
        holdback = max((len(s) for s in params.stop), default=1) - 1
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        try:
            if self.first_chunk_choices():
                yield self.envelope(self.first_chunk_choices(), chunk=True)
            async for prompt_index, output in merged:
                choices = []
                for c in output.outputs:
                    index = self.choice_index(prompt_index, c.index)
                    first = index not in sent_text
                    prefix = (self.prompts[prompt_index].text or "") if (self.echo and first) else ""
                    done = c.finish_reason is not None
                    limit = len(c.text) if done else max(sent_text.get(index, 0), len(c.text) - holdback)
                    text = c.text[sent_text.get(index, 0):limit]
                    start, end = sent_tokens.get(index, 0), len(c.token_ids)
                    wants_tokens = c.logprobs is not None or self.return_token_ids
                    if not text and not done and (start == end or not wants_tokens):
                        continue  # nothing a client could use yet (e.g. half a character held back)
                    if index in sent_text and sent_text[index] < 0:
                        continue  # already finished
                    choice = self.delta_choice(index, prefix + text, c, start, end, sent_text.get(index, 0), first,
                                               c.finish_reason)
                    if self.return_token_ids:
                        choice["token_ids"] = list(c.token_ids[start:end])
                        if first:
                            choice["prompt_token_ids"] = self.prompts[prompt_index].token_ids
                    choices.append(choice)
                    sent_text[index] = -1 if done else limit
                    sent_tokens[index] = end
                if output.finished:
                    finals[prompt_index] = output
                last = len(finals) == len(self.prompts) and not include_usage
                if choices or last:
                    chunk = self.envelope(choices, chunk=True)
                    if last and self.streams:
                        chunk["timing"] = self.timing()  # the final chunk carries the breakdown
                    yield chunk
        except Exception as e:
            api_error = _engine_error(e)
            yield error_body(api_error.message, api_error.type, api_error.status, api_error.param)
            return
        if include_usage:
            body = self.envelope([], chunk=True)
            body["usage"] = self.usage(finals)
            if self.streams:
                body["timing"] = self.timing()
            yield body

    def first_chunk_choices(self) -> list[dict]:
        return []


class ChatRenderer(CompletionRenderer):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def full_choice(self, prompt_index: int, c: CompletionOutput) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(c, 0, len(c.token_ids), 0), "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    def first_chunk_choices(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    def delta_choice(self, index, text, c, start, end, offset, first, finish) -> dict:
        return {"index": index, "delta": {"content": text} if text or not finish else {},
                "logprobs": self.logprobs(c, start, end, offset), "finish_reason": finish,
                "stop_reason": c.stop_reason if finish else None}

    def logprobs(self, c: CompletionOutput, start: int, end: int, offset: int) -> dict | None:
        if c.logprobs is None:
            return None
        content = []
        for token_id, entry in zip(c.token_ids[start:end], c.logprobs[start:end]):
            chosen = entry[token_id]
            content.append({"token": chosen.decoded_token or "", "logprob": chosen.logprob,
                            "bytes": list((chosen.decoded_token or "").encode()),
                            "top_logprobs": [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                                              "bytes": list((lp.decoded_token or "").encode())}
                                             for lp in _top_entries(entry, token_id)]})
        return {"content": content}
