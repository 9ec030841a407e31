"""Checks every front end applies before a request reaches the engine core."""

from __future__ import annotations

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams


def validate_request(prompt_token_ids: list[int], params: SamplingParams, *, max_model_len: int,
                     vocab_size: int) -> None:
    """Reject what the engine cannot serve, naming the problem and the limit."""
    num = len(prompt_token_ids)
    if num == 0:
        raise InvalidRequestError("the prompt is empty; it needs at least one token", param="prompt")
    if num > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens (max_model_len), but the prompt "
            f"has {num} tokens. Please reduce the length of the prompt.", param="prompt")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is out of range for the vocabulary [0, {vocab_size})",
                                  param="prompt")
    if params.stop and not params.detokenize:
        raise InvalidRequestError("stop strings need detokenize=True", param="stop")
