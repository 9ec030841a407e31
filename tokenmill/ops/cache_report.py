"""`tokenmill cache-report`: how good was the prefix cache, and how good could it have been?

Replays a request log (`tokenmill.ops.request_log`) and compares the prompt tokens the engine
actually found in its cache with what a cache of the same capacity could have found.

The model (block-granular, as the engine's cache is):

* A block is `block_size` tokens; block i of a sequence is identified by the whole prefix up to
  its end (chained hash, as in the engine) and the request's cache salt.
* Requests are replayed one at a time in arrival order. Each first *looks up* its prompt: the hit
  is the longest run of leading blocks present in the cache, over at most
  `(num_prompt_tokens - 1) // block_size` blocks (the engine always computes the last prompt
  token, so a fully cached prompt still recomputes its last block). Queries are the prompt tokens.
  Then it *inserts* every full block whose K/V it computed: prompt and output (generated blocks are
  cached too, so multi-turn conversations hit), i.e. the full blocks of
  `(prompt + output)[:len(prompt) + len(output) - 1]` (the last sampled token never runs through
  the model), and of each sequence when n > 1.
* Capacity: `capacity_tokens // block_size` blocks. The engine shares its pool with the blocks of
  running requests, so pass its KV capacity (logged at start-up) for an upper bound on what it can
  keep; the simulator ignores pinning by running requests and partial blocks.

Policies:

* infinite: nothing is ever evicted (the hit rate the workload allows at all).
* LRU: what the engine does. A request's blocks are used at its time, in reverse order (the
  engine frees a finished request's blocks tail first), so a sequence's tail is evicted before its
  head.
* Belady / OPT: on inserting a block into a full cache, evict, among the cached blocks and the new
  one (not inserting it is allowed), the one whose *next use* is farthest in the future. A *use*
  of a block is a later request whose lookup range (the first `(num_prompt_tokens - 1) //
  block_size` blocks of its prompt) contains it; being re-inserted is not a use, since it can never
  be a hit. Blocks never used again go first. Ties go to the deeper block (larger index in its
  sequence). Because every use of a block is also a use of its parent, a block's next use is never
  earlier than its parent's; with the tie-break a parent is never evicted before its cached
  children, so the cache stays prefix-closed, a lookup's hit equals the number of its blocks that
  are cached, and Belady's rule (optimal for independent unit-size pages with bypass) is optimal
  here too. The tests check it against exhaustive search on small traces.
* achieved: the sum of the log's `num_cached_tokens` (what the engine reported per request).

The cost of the gap: (Belady hit tokens - achieved hit tokens) / the log's duration (first arrival
to last finish) = prefill tokens per second the engine recomputed that a cache of the same size
could have served.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from tokenmill.engine.kv_cache_manager import NONE_HASH, hash_block_tokens


@dataclass
class TraceRequest:
    """One request of a trace: what it looked up and which blocks it computed."""

    prompt_token_ids: list[int]
    output_token_ids: list[list[int]] = field(default_factory=lambda: [[]])  # one list per sequence
    cache_salt: str | None = None
    arrival_time: float = 0.0
    finish_time: float | None = None
    num_cached_tokens: int | None = None  # what the engine reported, if known

    @classmethod
    def from_record(cls, record: dict) -> "TraceRequest":
        outputs = [list(record.get("output_token_ids") or [])]
        outputs += [list(x) for x in record.get("extra_output_token_ids") or []]
        return cls(prompt_token_ids=list(record["prompt_token_ids"]), output_token_ids=outputs,
                   cache_salt=record.get("cache_salt_id"), arrival_time=float(record["arrival_time"]),
                   finish_time=record.get("finish_time"), num_cached_tokens=record.get("num_cached_tokens"))


@dataclass
class _Access:
    lookup: list[bytes]  # blocks a hit may come from, in order
    insert: list[bytes]  # blocks computed by the request, head first, no repeats
    depth: dict[bytes, int]
    num_prompt_tokens: int


def _chain(tokens: Sequence[int], num_blocks: int, block_size: int, salt: str | None) -> list[bytes]:
    extra = ("salt", salt) if salt is not None else ()
    keys, parent = [], NONE_HASH
    for i in range(num_blocks):
        parent = hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size], extra if i == 0 else ())
        keys.append(parent)
    return keys


def build_accesses(trace: Sequence[TraceRequest], block_size: int) -> list[_Access]:
    accesses = []
    for req in trace:
        prompt = req.prompt_token_ids
        num_lookup = max(0, (len(prompt) - 1) // block_size)
        insert: dict[bytes, None] = {}
        depth: dict[bytes, int] = {}
        for output in req.output_token_ids or [[]]:
            tokens = list(prompt) + list(output)
            computed = max(len(prompt), len(tokens) - 1)
            for i, key in enumerate(_chain(tokens, computed // block_size, block_size, req.cache_salt)):
                insert[key] = None
                depth[key] = i
        lookup = list(insert)[:num_lookup]
        accesses.append(_Access(lookup, list(insert), depth, len(prompt)))
    return accesses


def _lookup_hits(lookup: list[bytes], cached) -> int:
    hits = 0
    for key in lookup:
        if key not in cached:
            break
        hits += 1
    return hits


def simulate_infinite(accesses: Sequence[_Access]) -> list[int]:
    """Hit blocks per request with no eviction."""
    cached: set[bytes] = set()
    hits = []
    for a in accesses:
        hits.append(_lookup_hits(a.lookup, cached))
        cached.update(a.insert)
    return hits


def simulate_lru(accesses: Sequence[_Access], capacity_blocks: int) -> list[int]:
    """Hit blocks per request under LRU at `capacity_blocks`, using blocks tail first."""
    cache: OrderedDict[bytes, None] = OrderedDict()  # head = least recently used
    hits = []
    for a in accesses:
        hits.append(_lookup_hits(a.lookup, cache))
        if capacity_blocks <= 0:
            continue
        for key in reversed(a.insert):
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = None
                if len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return hits


def simulate_belady(accesses: Sequence[_Access], capacity_blocks: int) -> list[int]:
    """Hit blocks per request under Belady's optimal eviction (see the module docstring)."""
    uses: dict[bytes, deque[int]] = defaultdict(deque)
    for index, a in enumerate(accesses):
        for key in a.lookup:
            uses[key].append(index)

    def next_use(key: bytes) -> float:
        q = uses.get(key)
        return q[0] if q else math.inf

    cache: dict[bytes, tuple[float, int]] = {}  # key -> (next use, depth), as last pushed
    heap: list[tuple[float, int, int, bytes]] = []  # (-next use, -depth, tiebreak, key): farthest first
    counter = 0

    def push(key: bytes, rank: tuple[float, int]) -> None:
        nonlocal counter
        cache[key] = rank
        heapq.heappush(heap, (-rank[0], -rank[1], counter, key))
        counter += 1

    def top() -> tuple[float, int, bytes]:
        while True:
            neg_use, neg_depth, _, key = heap[0]
            if cache.get(key) == (-neg_use, -neg_depth):
                return -neg_use, -neg_depth, key
            heapq.heappop(heap)  # stale: evicted, or its next use moved on

    hits = []
    for index, a in enumerate(accesses):
        hits.append(_lookup_hits(a.lookup, cache))
        for key in a.lookup:  # this use is now past
            q = uses[key]
            while q and q[0] <= index:
                q.popleft()
            if key in cache:
                push(key, (next_use(key), a.depth[key]))
        if capacity_blocks <= 0:
            continue
        for key in a.insert:
            if key in cache:
                continue
            rank = (next_use(key), a.depth[key])
            if len(cache) < capacity_blocks:
                push(key, rank)
                continue
            victim_use, victim_depth, victim = top()
            if rank >= (victim_use, victim_depth):
                continue  # the new block is the one to give up: do not insert it
            heapq.heappop(heap)
            del cache[victim]
            push(key, rank)
    return hits


@dataclass
class PolicyResult:
    name: str
    hit_tokens: int
    query_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass
class CacheReport:
    num_requests: int
    query_tokens: int
    duration_s: float
    block_size: int
    capacity_tokens: int | None
    infinite: PolicyResult
    lru: PolicyResult | None
    belady: PolicyResult | None
    achieved: PolicyResult | None  # None when the log has no num_cached_tokens

    @property
    def best(self) -> PolicyResult:
        """The reference for the gap: Belady at the capacity, or the infinite cache without one."""
        return self.belady or self.infinite

    @property
    def gap_tokens(self) -> int | None:
        return None if self.achieved is None else self.best.hit_tokens - self.achieved.hit_tokens

    @property
    def gap_tokens_per_s(self) -> float | None:
        if self.gap_tokens is None or self.duration_s <= 0:
            return None
        return self.gap_tokens / self.duration_s


def cache_report(trace: Sequence[TraceRequest], capacity_tokens: int | None = None,
                 block_size: int = 16) -> CacheReport:
    """Simulate the trace (in the given order, which should be arrival order)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if capacity_tokens is not None and capacity_tokens < 0:
        raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
    accesses = build_accesses(trace, block_size)
    queries = sum(a.num_prompt_tokens for a in accesses)

    def result(name: str, hit_blocks: list[int]) -> PolicyResult:
        return PolicyResult(name, sum(hit_blocks) * block_size, queries)

    lru = belady = None
    if capacity_tokens is not None:
        capacity_blocks = capacity_tokens // block_size
        lru = result("LRU (simulated)", simulate_lru(accesses, capacity_blocks))
        belady = result("Belady (optimal)", simulate_belady(accesses, capacity_blocks))
    achieved = None
    if trace and all(r.num_cached_tokens is not None for r in trace):
        achieved = PolicyResult("achieved (log)", sum(r.num_cached_tokens for r in trace), queries)
    start = min((r.arrival_time for r in trace), default=0.0)
    end = max((r.finish_time if r.finish_time is not None else r.arrival_time for r in trace), default=0.0)
    return CacheReport(num_requests=len(trace), query_tokens=queries, duration_s=max(0.0, end - start),
                       block_size=block_size, capacity_tokens=capacity_tokens,
                       infinite=result("infinite cache", simulate_infinite(accesses)),
                       lru=lru, belady=belady, achieved=achieved)


def format_report(report: CacheReport) -> str:
    lines = [f"{report.num_requests} requests, {report.query_tokens:,} prompt tokens over "
             f"{report.duration_s:,.1f} s (block size {report.block_size})"]
    if report.capacity_tokens is not None:
        lines.append(f"capacity: {report.capacity_tokens:,} tokens "
                     f"({report.capacity_tokens // report.block_size:,} blocks)")
    else:
        lines.append("capacity: not given (--capacity-tokens), so only the infinite cache is simulated")
    lines.append("")
    lines.append(f"{'':<20}{'hit tokens':>14}{'hit rate':>10}")
    for row in (report.achieved, report.lru, report.belady, report.infinite):
        if row is not None:
            lines.append(f"{row.name:<20}{row.hit_tokens:>14,}{row.hit_rate:>10.1%}")
    lines.append("")
    if report.achieved is None:
        lines.append("the log has no num_cached_tokens: no achieved rate to compare")
    else:
        what = "Belady at this capacity" if report.belady else "an infinite cache"
        rate = report.gap_tokens_per_s
        per_s = f" = {rate:,.1f} prefill tokens/s" if rate is not None else ""
        lines.append(f"gap to {what}: {report.gap_tokens:,} prompt tokens{per_s} computed that the "
                     f"cache could have served")
    return "\n".join(lines)


def load_trace(paths: Iterable[str]) -> list[TraceRequest]:
    from tokenmill.ops.request_log import read_request_log

    return [TraceRequest.from_record(r) for r in read_request_log(paths)]


# ---- command line -------------------------------------------------------------------------------

def add_cache_report_parser(subparsers) -> argparse.ArgumentParser:
    """Register `cache-report` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "cache-report", help="replay a request log: achieved prefix-cache hit rate vs LRU, optimal and infinite",
        description="Replay a request log (EngineConfig.request_log_path) and compare the prefix-cache hit "
                    "rate the engine achieved with an infinite cache and, at --capacity-tokens, LRU and "
                    "Belady's optimal eviction.")
    parser.add_argument("log", nargs="+", metavar="LOG",
                        help="request log file(s); list rotated files (LOG.1, ...) too to include them")
    parser.add_argument("--capacity-tokens", type=int, default=None,
                        help="cache capacity in tokens for LRU and Belady (e.g. the engine's KV capacity)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default: 16)")
    parser.set_defaults(func=run_cache_report)
    return parser


def run_cache_report(args: argparse.Namespace) -> int:
    try:
        trace = load_trace(args.log)
        report = cache_report(trace, args.capacity_tokens, args.block_size)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
