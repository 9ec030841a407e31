"""The in-process engine as a benchmark target: `AsyncLLM` (tokenization, detokenization, per-request
streams) in the benchmark's own process, the engine core in its own process as under `tokenmill serve`,
and no HTTP in between.

Measured the same way as an HTTP target (same records, same definitions): a request's chunks are the
cumulative outputs the stream yields, each carrying the tokens added since the previous one (exact
counts, like ``return_token_ids``). Running the same workload against this target and against
`tokenmill serve` of the same model tells what HTTP, JSON and SSE cost on top of the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shlex
import time

from tokenmill.bench.client import BenchRequest, Clock, Reply
from tokenmill.bench.metrics import RequestRecord, finalize


def engine_config_from_args(model: str, engine_args: str):
    """An EngineConfig from `tokenmill serve`-style flags (``--engine-args``)."""
    from tokenmill.config import EngineConfig
    from tokenmill.entrypoints.cli import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser(prog="--engine-args", add_help=False, exit_on_error=False)
    add_engine_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-queued-requests", type=int, default=1024)
    try:
        args, unknown = parser.parse_known_args(shlex.split(engine_args))
    except argparse.ArgumentError as e:
        raise ValueError(f"--engine-args: {e}") from None
    if unknown:
        raise ValueError(f"--engine-args: not an engine flag for the in-process engine: {' '.join(unknown)}")
    return EngineConfig(model=model, seed=args.seed, **engine_kwargs(args)), args.max_queued_requests


class EngineTarget:
    """A tokenmill engine in this process. ``await open()`` inside the event loop that runs the benchmark
    (it starts the engine core and its output thread), ``close()`` at the end."""

    in_process = True

    def __init__(self, config, max_queued_requests: int = 1024, model_name: str | None = None):
        self.config, self.max_queued_requests = config, max_queued_requests
        self.model = model_name or str(config.model)
        self.base_url = "in-process"
        self.server = "tokenmill in-process engine"
        self.max_model_len: int | None = None
        self.can_tokenize = True
        self.return_token_ids = True
        self.llm = None
        self.startup_s: float | None = None
        self._ids = itertools.count()

    async def open(self) -> None:
        from tokenmill.engine.async_llm import AsyncLLM

        start = time.perf_counter()
        # Loading weights and spawning the core blocks for seconds: off the event loop.
        self.llm = await asyncio.get_running_loop().run_in_executor(
            None, lambda: AsyncLLM(self.config, max_queued_requests=self.max_queued_requests))
        self.llm.start()
        self.startup_s = time.perf_counter() - start
        self.max_model_len = self.llm.max_model_len

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def tokenizer(self):
        """The engine's own tokenizer (exact lengths, no round trip)."""
        from tokenmill.bench.prompts import LocalTokenizer

        return LocalTokenizer(self.llm.tokenizer)

    def to_dict(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "server": self.server,
                "max_model_len": self.max_model_len, "can_tokenize": True, "return_token_ids": True,
                "startup_s": self.startup_s, "kv_capacity_tokens": self.llm.kv_capacity_tokens if self.llm else None}

    async def _prompt_ids(self, request: BenchRequest) -> tuple[str | None, list[int]]:
        if request.prompt_ids is not None:
            return None, list(request.prompt_ids)
        if request.messages is not None:   # as the chat endpoint does: the template, no extra BOS
            text = self.llm.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
            return text, await self.llm.tokenize(text, add_special_tokens=False)
        return request.prompt_text, await self.llm.tokenize(request.prompt_text)

    async def send(self, request: BenchRequest, *, temperature: float = 0.0, ignore_eos: bool = True,
                   timeout: float = 600.0, clock: Clock = time.perf_counter,
                   run_start: float = 0.0) -> tuple[RequestRecord, Reply]:
        """Submit one request and measure it as `client.send` does for HTTP. Never raises for a rejected or
        failed request: the engine's errors become the record's status and kind (``invalid`` for a
        request the engine refuses, ``overloaded``, ``engine_dead``, ``timeout``)."""
        from tokenmill.engine.async_llm import OverloadedError
        from tokenmill.engine.core_process import EngineDeadError
        from tokenmill.errors import InvalidRequestError
        from tokenmill.sampling_params import SamplingParams

        record = RequestRecord(index=request.index, conversation=request.conversation, turn=request.turn,
                               scheduled_s=request.scheduled_s, input_tokens=request.input_tokens,
                               max_tokens=request.max_tokens)
        reply = Reply()
        start = clock()
        record.send_s = start - run_start
        done = False
        try:
            prompt, ids = await self._prompt_ids(request)
            params = SamplingParams(max_tokens=request.max_tokens, temperature=temperature, ignore_eos=ignore_eos)
            stream = self.llm.submit(f"bench-{next(self._ids)}", prompt, ids, params)
            record.input_tokens = reply.prompt_tokens = len(ids)
            reply.prompt_token_ids = ids
            seen = 0
            async for output in self.llm.outputs(stream, timeout=timeout):
                now = clock() - start
                completion = output.outputs[0]
                new = len(completion.token_ids) - seen
                if new > 0:
                    record.chunks.append((now, new))
                    seen = len(completion.token_ids)
                if output.finished:
                    done = True
                    record.e2el = now
                    record.finish_reason = completion.finish_reason
                    record.cached_tokens = output.num_cached_tokens
                    reply.text, reply.token_ids = completion.text, list(completion.token_ids)
        except InvalidRequestError as e:
            record.status, record.error_kind, record.error = "error", "invalid", str(e)
        except OverloadedError as e:
            record.status, record.error_kind, record.error = "error", "overloaded", str(e)
        except EngineDeadError as e:
            record.status, record.error_kind, record.error = "error", "engine_dead", str(e)
        except asyncio.TimeoutError:
            record.status, record.error_kind = "timeout", "timeout"
            record.error = f"no complete response within {timeout:g} s"
        except ValueError as e:   # e.g. a chat request to a model without a chat template
            record.status, record.error_kind, record.error = "error", "invalid", str(e)
        record.end_s = clock() - run_start
        if record.status == "ok" and not done:
            record.status, record.error_kind = "incomplete", "no_done"
            record.error = "the stream ended before the request finished"
        record.output_tokens = len(reply.token_ids) if done else sum(k for _, k in record.chunks)
        finalize(record, True, ignore_eos)
        return record, reply
