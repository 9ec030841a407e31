"""Prompts of exact token lengths for the target's tokenizer, and the conversations that reuse them.

Token-id prompts (``/v1/completions``) are slices of the corpus as the target tokenizes it (one
``/tokenize`` call), so their lengths are exact by construction. Text prompts (chat messages) are
decoded from such slices with ``/detokenize`` and re-tokenized with ``/tokenize`` until the count is
exact (a few tries; the nearest is kept and counted in ``inexact_prompts``). Without ``/tokenize`` on the
target and without ``--tokenizer``, text is cut at about 4 characters per token and lengths are
approximate (``lengths_exact`` false). Every new input starts with a few tokens drawn at random so that
requests share a prefix only where the workload says so.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

import httpx
import numpy as np

from tokenmill.bench.client import BenchRequest, Reply, Target
from tokenmill.bench.corpus import CORPUS
from tokenmill.bench.workload import Workload

SALT_TOKENS = 4
CHARS_PER_TOKEN = 4.0
CHAT_OVERHEAD_PER_MESSAGE = 8   # template tokens per message, for fitting conversations in the context
MAX_FIX_ROUNDS = 6


class ServerTokenizer:
    """The target's own /tokenize and /detokenize."""
    exact = True

    def __init__(self, http: httpx.AsyncClient, target: Target):
        self.http, self.target = http, target

    async def encode(self, text: str) -> list[int]:
        r = await self.http.post(self.target.base_url + "/tokenize", headers=self.target.request_headers(),
                                 json={"model": self.target.model, "prompt": text, "add_special_tokens": False})
        r.raise_for_status()
        return r.json()["tokens"]

    async def decode(self, ids: list[int]) -> str:
        r = await self.http.post(self.target.base_url + "/detokenize", headers=self.target.request_headers(),
                                 json={"model": self.target.model, "tokens": ids})
        r.raise_for_status()
        return r.json()["prompt"]


class LocalTokenizer:
    """A tokenizer in this process: a local Hugging Face tokenizer directory (--tokenizer, for targets
    without /tokenize), or the in-process engine's own tokenizer."""
    exact = True

    def __init__(self, tokenizer):
        from tokenmill.tokenizer import Tokenizer

        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)

    async def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    async def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


@dataclass
class Piece:
    """A run of prompt content: token ids, text, or both; n = its length in tokens."""
    n: int
    ids: list[int] | None = None
    text: str | None = None


class PromptFactory:
    """Makes content of exact token lengths from the corpus."""

    def __init__(self, tokenizer=None, corpus: str = CORPUS):
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.pool: list[int] = []
        self.words = corpus.split()
        self.inexact = 0

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    async def setup(self) -> None:
        if self.tokenizer is not None and not self.pool:
            self.pool = list(await self.tokenizer.encode(self.corpus))
            if len(self.pool) < 2 * SALT_TOKENS:
                raise ValueError("the corpus tokenizes to too few tokens")

    def ids(self, n: int, rng: np.random.Generator) -> list[int]:
        """n corpus token ids: a few random ones, then a contiguous (cyclic) slice from a random start."""
        if n <= 0:
            return []
        salt = min(SALT_TOKENS, n)
        return [self.pool[i] for i in rng.integers(0, len(self.pool), size=salt)] + self._slice(n - salt, rng)

    def _slice(self, n: int, rng: np.random.Generator) -> list[int]:
        start = int(rng.integers(0, len(self.pool)))
        reps = math.ceil((start + n) / len(self.pool)) + 1
        return (self.pool * reps)[start:start + n]

    async def text(self, n: int, rng: np.random.Generator) -> Piece:
        """Text that tokenizes (on its own, without special tokens) to n tokens."""
        if n <= 0:
            return Piece(0, [], "")
        if self.tokenizer is None:
            start = int(rng.integers(0, len(self.words)))
            words, chars = [], 0
            while chars < n * CHARS_PER_TOKEN:
                word = self.words[(start + len(words)) % len(self.words)]
                words.append(word)
                chars += len(word) + 1
            return Piece(n, None, " ".join(words))
        ids = self.ids(n, rng)
        best: Piece | None = None
        for _ in range(MAX_FIX_ROUNDS):
            text = await self.tokenizer.decode(ids)
            got = len(await self.tokenizer.encode(text))
            if best is None or abs(got - n) < abs(best.n - n):
                best = Piece(got, None, text)
            if got == n:
                return best
            if got > n:
                ids = ids[:max(1, len(ids) - (got - n))]
            else:
                ids = ids + self._slice(n - got, rng)
        self.inexact += 1
        return best

    async def piece(self, n: int, rng: np.random.Generator, as_text: bool) -> Piece:
        if as_text or not self.exact:
            return await self.text(n, rng)
        return Piece(n, self.ids(n, rng))

    def filler(self, n: int, rng: np.random.Generator) -> list[int]:
        return self.ids(n, rng)


@dataclass
class Conversation:
    id: int
    group: int
    turns: int
    done: int = 0
    history: list[tuple[str, Piece]] = field(default_factory=list)   # (role, content) of earlier turns
    context: int = 0     # tokens of the conversation so far (prefix, history, chat template), best estimate


class RequestSource:
    """The requests of one run, in order. Each call of ``next()`` takes the next planned input/output
    lengths and gives them to the conversation that has waited longest for its next turn (a finished
    turn makes its conversation ready again); when none is ready, a new conversation starts. So the
    arrival process sets the request rate and conversations interleave as they would with many users."""

    def __init__(self, workload: Workload, factory: PromptFactory, n: int, seed: int | list[int],
                 max_model_len: int | None = None, prefix_seed: int | None = None):
        self.w, self.factory, self.n = workload, factory, n
        self.rng = np.random.default_rng(seed)
        self.max_model_len = max_model_len
        self.as_text = workload.prompt_source == "text" or not factory.exact
        self.chat = workload.api == "chat"
        if prefix_seed is None:
            prefix_seed = seed if isinstance(seed, int) else seed[0]
        self.prefix_seed = prefix_seed
        self.prefixes: list[Piece] = []
        trace = workload.arrival.trace if workload.arrival.process == "trace" else []
        self.input_lens = workload.input_tokens.sample(self.rng, n)
        self.output_lens = workload.output_tokens.sample(self.rng, n)
        for i, entry in enumerate(trace[:n]):
            if entry.input_tokens:
                self.input_lens[i] = entry.input_tokens
            if entry.output_tokens:
                self.output_lens[i] = entry.output_tokens
        self.inputs: list[Piece] = []
        self.issued = 0
        self.ready: deque[Conversation] = deque()
        self.conversations = 0
        self.clipped = 0
        self.stand_in_outputs = 0

    async def prepare(self, concurrency: int = 16) -> None:
        """Build every request's new input (and the shared prefixes) before the clock starts."""
        await self.factory.setup()
        if not self.prefixes and self.w.prefix.shared_tokens:
            prefix_rng = np.random.default_rng([self.prefix_seed, 7])  # the same prefixes in every run
            self.prefixes = [await self.factory.piece(self.w.prefix.shared_tokens, prefix_rng, self.as_text)
                             for _ in range(self.w.prefix.groups)]
        seeds = self.rng.integers(0, 1 << 62, size=self.n)
        semaphore = asyncio.Semaphore(concurrency)

        async def build(i):
            async with semaphore:
                return await self.factory.piece(int(self.input_lens[i]), np.random.default_rng(seeds[i]), self.as_text)

        self.inputs = list(await asyncio.gather(*(build(i) for i in range(self.n))))

    @property
    def exhausted(self) -> bool:
        return self.issued >= self.n

    def _overhead(self, messages: int) -> int:
        return CHAT_OVERHEAD_PER_MESSAGE * messages if self.chat else 0

    def _fits(self, context: int, new: int, max_tokens: int) -> bool:
        if self.max_model_len is None:
            return True
        return context + new + self._overhead(1) + max_tokens <= self.max_model_len

    def next(self, scheduled_s: float = 0.0) -> BenchRequest | None:
        if self.exhausted:
            return None
        i = self.issued
        self.issued += 1
        new, max_tokens = self.inputs[i], int(self.output_lens[i])
        conv = self.ready.popleft() if self.ready else None
        if conv is not None and not self._fits(conv.context, new.n, max_tokens):
            conv = None   # the conversation outgrew the context window: that user starts over
        if conv is None:
            conv = self._new_conversation()
            prefix_n = conv.context
            if not self._fits(prefix_n, new.n, max_tokens):
                new, max_tokens = self._clip(prefix_n, new, max_tokens)
        request = self._build(i, conv, new, max_tokens, scheduled_s)
        conv.history.append(("user", new))
        return request

    def _new_conversation(self) -> Conversation:
        group = int(self.rng.integers(0, len(self.prefixes))) if self.prefixes else 0
        turns = int(self.w.prefix.turns.sample(self.rng, 1)[0]) if self.w.prefix.multi_turn else 1
        conv = Conversation(self.conversations, group, max(1, turns))
        conv.context = self.prefixes[group].n + self._overhead(1) if self.prefixes else 0
        self.conversations += 1
        return conv

    def _clip(self, prefix_n: int, new: Piece, max_tokens: int) -> tuple[Piece, int]:
        """Shrink a request that cannot fit the context window even alone."""
        self.clipped += 1
        room = self.max_model_len - prefix_n - self._overhead(1)
        max_tokens = min(max_tokens, max(1, room // 2))
        n = max(1, room - max_tokens)
        if new.ids is not None:
            return Piece(n, new.ids[:n]), max_tokens
        keep = max(1, int(len(new.text) * n / max(1, new.n) * 0.9))
        return Piece(n, None, new.text[:keep]), max_tokens

    def _build(self, i: int, conv: Conversation, new: Piece, max_tokens: int, scheduled_s: float) -> BenchRequest:
        prefix = self.prefixes[conv.group] if self.prefixes else None
        input_tokens = conv.context + new.n
        req = BenchRequest(index=i, max_tokens=max_tokens, input_tokens=input_tokens, conversation=conv.id,
                           turn=conv.done, scheduled_s=scheduled_s)
        req._conversation = conv  # type: ignore[attr-defined]
        if self.chat:
            messages = [{"role": "system", "content": prefix.text}] if prefix is not None else []
            messages += [{"role": role, "content": piece.text} for role, piece in conv.history]
            messages.append({"role": "user", "content": new.text})
            req.messages = messages
        elif self.as_text:
            req.prompt_text = "".join(p.text for p in ([prefix] if prefix else []) + [pc for _, pc in conv.history]
                                      + [new])
        else:
            ids = list(prefix.ids) if prefix is not None else []
            for _, piece in conv.history:
                ids.extend(piece.ids)
            ids.extend(new.ids)
            req.prompt_ids = ids
            req.input_tokens = len(ids)
        return req

    async def complete(self, request: BenchRequest, ok: bool, reply: Reply, output_tokens: int,
                       prompt_tokens: int | None = None) -> None:
        """A request finished: its conversation may take its next turn. prompt_tokens: the server's
        usage.prompt_tokens for it (exact, chat template included), which re-anchors the context size."""
        conv: Conversation = request._conversation  # type: ignore[attr-defined]
        new = conv.history[-1][1]
        if not ok:
            return   # that user gives up on the conversation
        conv.done += 1
        if self.chat or self.as_text:
            # the reply goes back as text, which need not re-tokenize to the tokens generated
            n = output_tokens
            if self.factory.tokenizer is not None and reply.text:
                n = len(await self.factory.tokenizer.encode(reply.text))
            elif reply.text:
                n = max(output_tokens, int(len(reply.text) / CHARS_PER_TOKEN) + 1)
            out = Piece(n, None, reply.text)
        elif reply.token_ids and len(reply.token_ids) == output_tokens:
            out = Piece(output_tokens, list(reply.token_ids))
        else:
            self.stand_in_outputs += 1
            out = Piece(output_tokens, self.factory.filler(output_tokens, self.rng))
        conv.history.append(("assistant", out))
        base = prompt_tokens if prompt_tokens else conv.context + new.n + self._overhead(1)
        conv.context = base + out.n + self._overhead(1)
        if conv.done < conv.turns:
            self.ready.append(conv)

    def stats(self) -> dict:
        return {"conversations": self.conversations, "clipped_requests": self.clipped,
                "stand_in_outputs": self.stand_in_outputs, "inexact_prompts": self.factory.inexact,
                "lengths_exact": self.factory.exact}
