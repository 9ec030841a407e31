"""Front-end side of each request: turns the core's token ids into text and `RequestOutput`s.

Detokenizes incrementally, applies stop strings (telling the core to stop the request), builds
logprob dicts, and gathers the n sequences of a request with n > 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from tokenmill.engine.messages import EngineCoreOutput
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.tokenizer import Tokenizer


@dataclass
class SequenceState:
    """One generated sequence (one of the n of a request), as the front end tracks it."""

    core_request_id: str
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    stop_checked_chars: int = 0  # text already searched for stop strings
    num_cached_tokens: int = 0  # prompt tokens the core found in its prefix cache

    def completion(self) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=self.text, token_ids=list(self.token_ids),
                                cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceState]
    final_only: bool = False  # RequestOutputKind.FINAL_ONLY: no outputs before the finished one
    first_token_time: float | None = None  # time.monotonic() when the first token arrived

    @property
    def finished(self) -> bool:
        if len(self.sequences) == 1:  # the common case, checked for every request every step
            return self.sequences[0].finish_reason is not None
        return all(s.finish_reason is not None for s in self.sequences)

    def output(self) -> RequestOutput:
        metrics = {} if self.first_token_time is None else {"first_token_time": self.first_token_time}
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids,
                             outputs=[s.completion() for s in self.sequences], finished=self.finished,
                             num_cached_tokens=self.sequences[0].num_cached_tokens, metrics=metrics)


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{index}_{request_id}"


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.sequences: dict[str, tuple[RequestState, SequenceState]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: list[SamplingParams]) -> list[str]:
        """Track a request whose n sequences run under the returned core request ids."""
        final_only = all(p.output_kind is RequestOutputKind.FINAL_ONLY for p in params)
        state = RequestState(request_id, prompt, prompt_token_ids, [], final_only=final_only)
        for index, seq_params in enumerate(params):
            detok = None
            if seq_params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, seq_params.skip_special_tokens)
            seq = SequenceState(child_request_id(request_id, index, len(params)), index, seq_params, detok,
                                logprobs=[] if seq_params.logprobs is not None else None,
                                cumulative_logprob=0.0 if seq_params.logprobs is not None else None)
            state.sequences.append(seq)
            self.sequences[seq.core_request_id] = (state, seq)
        self.requests[request_id] = state
        return [s.core_request_id for s in state.sequences]

    def core_request_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return [s.core_request_id for s in state.sequences if s.finish_reason is None] if state else []

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs. Returns (updated RequestOutputs, core ids stopped by a stop string);
        a FINAL_ONLY request is in the first list only once it has finished."""
        updated: dict[str, RequestState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for out in outputs:
            entry = self.sequences.get(out.request_id)
            if entry is None:
                continue  # finished here already (stop string) while the core ran one more step
            state, seq = entry
            if state.first_token_time is None and out.new_token_ids:
                state.first_token_time = now
            seq.num_cached_tokens = out.num_cached_tokens
            self._apply(seq, out)
            if seq.finish_reason is None and out.finish_reason is None and seq.params.stop \
                    and self._check_stop_strings(seq):
                stopped.append(seq.core_request_id)
            if seq.finish_reason is None and out.finish_reason is not None:
                seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
                if seq.detokenizer is not None:
                    seq.text += seq.detokenizer.flush()
                    # A stop string completed by the flushed text still stops (and trims) here.
                    if seq.params.stop:
                        self._check_stop_strings(seq)
            updated[state.request_id] = state
        results = []
        for state in updated.values():
            finished = state.finished
            if finished or not state.final_only:
                results.append(state.output())
            if finished:
                self._forget(state)
        return results, stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.get(request_id)
        if state is None:
            return None
        for seq in state.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        self._forget(state)
        return state.output()

    def _forget(self, state: RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for seq in state.sequences:
            self.sequences.pop(seq.core_request_id, None)

    def _apply(self, seq: SequenceState, out: EngineCoreOutput) -> None:
        for i, token_id in enumerate(out.new_token_ids):
            seq.token_ids.append(token_id)
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.add_token(token_id)
            if seq.logprobs is not None and out.new_logprobs:
                lp = out.new_logprobs[i]
                seq.cumulative_logprob += lp.sampled_logprob
                entry = {token_id: Logprob(lp.sampled_logprob, lp.sampled_rank, self._token_text(token_id))}
                for rank, (top_id, top_lp) in enumerate(zip(lp.top_token_ids, lp.top_logprobs), start=1):
                    if top_id not in entry:
                        entry[top_id] = Logprob(top_lp, rank, self._token_text(top_id))
                seq.logprobs.append(entry)

    def _check_stop_strings(self, seq: SequenceState) -> bool:
        # Only the text added since the last check can complete a stop string.
        new_chars = len(seq.text) - seq.stop_checked_chars
        seq.stop_checked_chars = len(seq.text)
        hit = find_stop_string(seq.text, new_chars, seq.params.stop)
        if hit is None:
            return False
        index, stop = hit
        seq.text = seq.text[:index + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _token_text(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else None
