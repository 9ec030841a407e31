"""Opt-in JSONL log of finished requests, for offline analysis (`tokenmill cache-report`).

One line per finished request, written when it finishes (or is aborted)::

    {"request_id": "17", "arrival_time": 1718000000.123, "first_token_time": 1718000000.201,
     "finish_time": 1718000001.532, "finish_reason": "length", "num_prompt_tokens": 5,
     "num_cached_tokens": 0, "cache_salt_id": null, "prompt_token_ids": [1, 2, 3, 4, 5],
     "output_token_ids": [6, 7]}

(on one line, without spaces). Times are Unix seconds (wall clock). `num_cached_tokens` is the
number of prompt tokens the engine found in its prefix cache. `cache_salt_id` is a short SHA-256
of the request's cache salt (null without one): equal salts give equal ids, but the salt itself,
which guards a tenant's cache, is not written. For a request with n > 1 sequences,
`output_token_ids` is sequence 0's and `extra_output_token_ids` lists the others'.

The file is rotated by size like `logging.handlers.RotatingFileHandler`: a line that would take it
past `max_bytes` first moves it to `PATH.1` (`PATH.1` to `PATH.2`, ... keeping `backup_count`
old files; with 0 the old contents are dropped). A single line larger than `max_bytes` is still
written whole, alone in its file. Lines are flushed as written, so the log can be read while the
engine runs. The log holds prompts and outputs as token ids: it is off unless configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tokenmill.outputs import RequestOutput


def cache_salt_id(cache_salt: str | None) -> str | None:
    """A stable, non-reversible stand-in for a cache salt (equal salts, equal ids)."""
    if cache_salt is None:
        return None
    return hashlib.sha256(cache_salt.encode()).hexdigest()[:16]


@dataclass
class _Pending:
    prompt_token_ids: list[int]
    arrival_time: float  # monotonic
    cache_salt: str | None
    first_token_time: float | None = None  # monotonic


class RequestLog:
    """Appends one JSON line per finished request to `path`, rotating by size. Thread-safe.

    Front ends either call `log(...)` with everything themselves, or `add_request(...)` when a
    request is submitted and `observe(outputs)` with each batch of `RequestOutput`s (which notes
    the first token and writes the line once the request has finished).
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int = 256 * 2**20, backup_count: int = 5):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if backup_count < 0:
            raise ValueError(f"backup_count must be >= 0, got {backup_count}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._size = self._file.tell()
        self._pending: dict[str, _Pending] = {}

    # ---- writing ------------------------------------------------------------------------------

    def log(self, *, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
            num_cached_tokens: int, arrival_time: float, first_token_time: float | None,
            finish_time: float, finish_reason: str | None = None, cache_salt: str | None = None,
            extra_output_token_ids: Sequence[Sequence[int]] | None = None) -> None:
        """Write one request's line. Times are Unix seconds."""
        record = {
            "request_id": request_id,
            "arrival_time": round(arrival_time, 6),
            "first_token_time": None if first_token_time is None else round(first_token_time, 6),
            "finish_time": round(finish_time, 6),
            "finish_reason": finish_reason,
            "num_prompt_tokens": len(prompt_token_ids),
            "num_cached_tokens": num_cached_tokens,
            "cache_salt_id": cache_salt_id(cache_salt),
            "prompt_token_ids": list(prompt_token_ids),
            "output_token_ids": list(output_token_ids),
        }
        if extra_output_token_ids:
            record["extra_output_token_ids"] = [list(x) for x in extra_output_token_ids]
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._file.closed:
                raise ValueError(f"request log {self.path} is closed")
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._file.flush()
            self._size += len(line)

    def _rotate(self) -> None:
        self._file.close()
        if self.backup_count:
            for i in range(self.backup_count - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "wb")
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._file.close()

    # ---- front-end helpers (monotonic clock, as the engine uses) ------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], arrival_time: float,
                    cache_salt: str | None = None) -> None:
        """Start tracking a submitted request (`arrival_time` from time.monotonic())."""
        self._pending[request_id] = _Pending(list(prompt_token_ids), arrival_time, cache_salt)

    def observe(self, outputs: Iterable[RequestOutput], now: float | None = None) -> None:
        """Note first tokens and write the line of each request that has finished."""
        now = time.monotonic() if now is None else now
        for output in outputs:
            pending = self._pending.get(output.request_id)
            if pending is None:
                continue
            if pending.first_token_time is None and any(c.token_ids for c in output.outputs):
                # The output processor's clock when it has one (a FINAL_ONLY request is seen only at the end).
                pending.first_token_time = output.metrics.get("first_token_time", now)
            if not output.finished:
                continue
            del self._pending[output.request_id]
            to_unix = time.time() - time.monotonic()
            seqs = output.outputs
            self.log(request_id=output.request_id, prompt_token_ids=pending.prompt_token_ids,
                     output_token_ids=seqs[0].token_ids if seqs else [],
                     num_cached_tokens=output.num_cached_tokens,
                     arrival_time=pending.arrival_time + to_unix,
                     first_token_time=None if pending.first_token_time is None
                     else pending.first_token_time + to_unix,
                     finish_time=now + to_unix,
                     finish_reason=seqs[0].finish_reason if seqs else None,
                     cache_salt=pending.cache_salt,
                     extra_output_token_ids=[c.token_ids for c in seqs[1:]] or None)


def read_request_log(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """All records of the given log files (rotated ones included if listed), in arrival order.
    Blank lines are skipped; a truncated last line (a log being written) is ignored."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    continue  # the line being written
                raise ValueError(f"{path}:{number}: not a JSON line") from None
    records.sort(key=lambda r: r["arrival_time"])
    return records
