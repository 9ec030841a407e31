"""The in-process engine: front end (validate, tokenize, detokenize) + engine core, stepped by the caller.

`LLM` drives it to completion for offline use; the server (its own issue) puts the core in another
process and keeps this front end in the API process, with the same messages in between.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.engine.messages import EngineCoreRequest
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.validation import validate_request
from tokenmill.errors import InvalidRequestError
from tokenmill.ops.request_log import RequestLog
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        tokenizer_dir = Path(config.tokenizer or config.model)
        self.tokenizer = Tokenizer(tokenizer_dir)
        self.core = EngineCore(config, self.model_config)
        self.max_model_len = self.core.max_model_len
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.request_log = RequestLog(config.request_log_path, config.request_log_max_bytes,
                                      config.request_log_backup_count) if config.request_log_path else None

    def next_request_id(self) -> str:
        return str(next(self._ids))

    # ---- input ----------------------------------------------------------------------------------

    def process_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt as text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...} -> (text, ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                                  param="prompt")

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, max_model_len=self.max_model_len,
                         vocab_size=self.model_config.vocab_size)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None) -> None:
        """Validate and submit. Raises InvalidRequestError without touching the engine's state."""
        text, token_ids = self.process_prompt(prompt)
        self.validate(token_ids, params)
        self.submit(request_id, text, token_ids, params, arrival_time, cache_salt)

    def submit(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams,
               arrival_time: float | None = None, cache_salt: str | None = None) -> None:
        """Submit an already tokenized and validated request. Requests with different
        `cache_salt`s never share prefix-cache blocks."""
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        children = params.per_sequence()
        core_ids = self.output_processor.add_request(request_id, text, token_ids, children)
        eos = tuple(self.model_config.eos_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for core_id, child in zip(core_ids, children):
            self.core.add_request(EngineCoreRequest(core_id, token_ids, child, eos, arrival, cache_salt))
        if self.request_log is not None:
            self.request_log.add_request(request_id, token_ids, arrival, cache_salt)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.abort_requests(self.output_processor.core_request_ids(request_id))
        output = self.output_processor.abort(request_id)
        if self.request_log is not None and output is not None:
            self.request_log.observe([output])
        return output

    # ---- the loop ---------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the requests that changed."""
        core_outputs = self.core.step()
        outputs, stopped = self.output_processor.process_outputs(core_outputs.outputs)
        if stopped:
            self.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        if self.request_log is not None:
            self.request_log.observe(outputs)
        return outputs
