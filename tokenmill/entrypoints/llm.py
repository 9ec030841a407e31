"""`LLM`: offline batch generation, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import fields
from typing import Sequence

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, PromptType
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

_ENGINE_ARGS = {f.name for f in fields(EngineConfig)}


class LLM:
    """Load a model once and generate for batches of prompts.

    >>> llm = LLM(model="path/to/hf-model", dtype="bfloat16", max_model_len=4096)
    >>> outs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32))
    >>> outs[0].outputs[0].text

    Keyword arguments are `EngineConfig` fields (dtype, max_model_len, block_size,
    gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
    num_kv_blocks, cpu_kv_cache_gib, device, load_format, seed, tokenizer).
    """

    def __init__(self, model: str, **engine_args):
        unknown = sorted(set(engine_args) - _ENGINE_ARGS)
        if unknown:
            raise TypeError(f"unknown engine arguments {unknown}; known: {sorted(_ENGINE_ARGS - {'model'})}")
        self.llm_engine = LLMEngine(EngineConfig(model=str(model), **engine_args))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished RequestOutput per prompt, in order.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}. All prompts are
        validated before any runs: a bad one raises InvalidRequestError naming its index.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompt_list)} prompts")
        engine = self.llm_engine
        # Only finished outputs are returned: skip building the per-step ones (vLLM does the same).
        final = RequestOutputKind.FINAL_ONLY
        params_list = [p if p.output_kind is final else p.clone(output_kind=final) for p in params_list]
        processed = []
        for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
            try:
                text, token_ids = engine.process_prompt(prompt)
                engine.validate(token_ids, params)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"prompt {i}: {e.message}", param=e.param) from None
            processed.append((text, token_ids, params))
        ids = []
        for text, token_ids, params in processed:
            ids.append(engine.next_request_id())
            engine.submit(ids[-1], text, token_ids, params)
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.llm_engine.tokenizer
        # The template already writes any BOS it wants: encode without adding special tokens.
        prompts = [{"prompt_token_ids": tokenizer.encode(tokenizer.apply_chat_template(c), add_special_tokens=False)}
                   for c in conversations]
        return self.generate(prompts, sampling_params)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
