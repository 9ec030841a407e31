"""A request as the engine core sees it: token ids, progress through the model, and status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams


# The id of a token still being sampled on the device (never a real token id).
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits to be recomputed from scratch
    FINISHED_STOPPED = "stop"  # EOS, a stop token, or a stop string (front end)
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One sequence being generated. `all_token_ids` = prompt + output; the first
    `num_computed_tokens` of them have their K/V in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Speculative decoding seam: draft tokens proposed for this request, verified in the next step.
    spec_token_ids: list[int] = field(default_factory=list)
    # Prefix caching: requests with different salts never share KV blocks (tenant isolation).
    cache_salt: str | None = None
    # Chained hashes of the full blocks of all_token_ids, filled lazily by the KV-cache manager.
    block_hashes: list[bytes] = field(default_factory=list)
    # Prompt tokens found in the prefix cache at the first admission (None until admitted); what
    # the API reports as usage.prompt_tokens_details.cached_tokens.
    num_cached_tokens: int | None = None
    # Tokens the latest admission had to fill (the prompt; prompt + outputs when resumed after a
    # preemption): positions below it are prefill, at or above it decode.
    num_prefill_tokens: int = 0
    # Timestamps (monotonic seconds) for metrics.
    scheduled_time: float | None = None
    first_token_time: float | None = None
    # Async scheduling: output tokens still being sampled on the device by a launched step. Each is a
    # PLACEHOLDER at the end of output_token_ids / all_token_ids until the step's result arrives;
    # the model runner reads the real id from that step's token tensor on the device.
    num_pending_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids are known on the host (all but the pending placeholders)."""
        return len(self.all_token_ids) - self.num_pending_tokens

    def append_placeholder(self) -> None:
        """A token a launched step is sampling: its id is filled in by `resolve_placeholder`."""
        self.append_output_token(PLACEHOLDER)
        self.num_pending_tokens += 1

    def resolve_placeholder(self, token_id: int) -> int:
        """Fill in the oldest pending token; returns its index in output_token_ids."""
        index = self.num_output_tokens - self.num_pending_tokens
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id
        self.num_pending_tokens -= 1
        return index
