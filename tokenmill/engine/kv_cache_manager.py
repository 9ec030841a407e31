"""KV-cache bookkeeping on the host: which blocks each request owns, and automatic prefix caching.

The device tensors live in the model runner; this side only hands out block ids. The design
follows vLLM v1's `BlockPool` / `KVCacheManager`:

* Every block has a reference count (the number of running requests whose block table holds it).
* A *full* block (block_size tokens whose K/V are computed) gets a hash chained over the tokens of
  the whole prefix up to and including it: ``h_i = H(h_{i-1}, tokens of block i, extra keys)``.
  Anything that changes the K/V of the prefix goes into the extra keys of the first block (today the
  request's `cache_salt`; a LoRA id would go there too); the chain carries it into every later
  block, so two requests with different salts never share a block. `hash -> block` finds a cached
  block.
* Blocks with reference count 0 sit in a free queue ordered by eviction priority (head = evicted
  first). A freed request's blocks are appended at the tail in reverse order, so the tail of a
  sequence is evicted before its head (a later request needs the head to reach the tail anyway).
  Freed blocks that hold no hash (partial last block, a duplicate of an already cached block)
  go to the head instead: they can never be hit, so they are reused first.
* A free block keeps its hash until it is handed out again; handing it out (taking it from the head)
  evicts it from `hash -> block`. A cache hit on a free block takes it out of the queue (its count
  goes to 1).

Hash: SHA-256 over a fixed-layout encoding (parent digest, 4-byte little-endian token ids, extra
keys with a length prefix). It is deterministic across processes and machines (unlike Python's
`hash` of a str salt) and collision-resistant, so a hit never needs the tokens compared; a block
costs about a microsecond to hash.

A block is registered in the hash map when the step that fills it is *scheduled*, before the
model runs (as in vLLM): a request admitted later in the same step may hit it. That is sound
because every layer writes the step's K/V for all requests (`write_kv`) before any attention reads
the cache; attention kernels must keep that order.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Sequence

from tokenmill.engine.request import Request

BlockHash = bytes

# Parent of the first block of every sequence.
NONE_HASH: BlockHash = bytes(32)


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int], extra_keys: tuple = ()) -> BlockHash:
    """Chained hash of one full block. `extra_keys` (ints/strs, e.g. the cache salt) are only
    needed on the first block: the chain carries them on."""
    h = hashlib.sha256(parent)
    if extra_keys:
        extra = repr(tuple(extra_keys)).encode()
        h.update(struct.pack("<I", len(extra)))
        h.update(extra)
    else:
        h.update(b"\0\0\0\0")
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def request_extra_keys(request: Request) -> tuple:
    """What besides the tokens changes the K/V of a request's prefix (first block only)."""
    return ("salt", request.cache_salt) if request.cache_salt is not None else ()


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    """All blocks, their reference counts, the hash -> cached block map and the free queue."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Block ids with ref_cnt 0, head first: the head is taken (and evicted) first.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0  # cached blocks handed out for other tokens (cumulative)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: never used, or cached but unreferenced (evictable)."""
        return len(self.free_queue)

    @property
    def num_cached(self) -> int:
        """Blocks that hold a hash (referenced or not)."""
        return len(self.cached)

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash)

    def get_new_blocks(self, count: int) -> list[KVBlock]:
        """Take `count` blocks from the head of the free queue, evicting any hash they held."""
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        taken = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: list[KVBlock]) -> None:
        """One more request uses these (cache hits): out of the free queue if unreferenced."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each, in eviction order (first freed = evicted first among
        them). Blocks without a hash are worthless to keep and go to the head."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"KV block {block.block_id} freed more often than taken")
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block. If another block already holds this hash (two requests computed
        the same prefix at once), the existing one stays the cached copy and this one is left
        unhashed, to be reused first once freed."""
        if block.block_hash is not None:
            return  # a hit, or registered already
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible while no block is referenced."""
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()
        return True


class KVCacheManager:
    """Per-request block tables over one `BlockPool`, with automatic prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        # Leading blocks of each request already registered in the hash map (or passed over).
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def allocator(self) -> BlockPool:
        """The block pool, under its pre-prefix-caching name (`num_free`, `num_blocks`)."""
        return self.block_pool

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, 0..1 (vLLM's kv_cache_usage_perc). Cached
        blocks no request uses count as free: they are evicted on demand."""
        return 1.0 - self.block_pool.num_free / self.block_pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------------

    def block_hashes(self, request: Request, num_blocks: int | None = None) -> list[BlockHash]:
        """The request's chained block hashes for its full blocks (or the first `num_blocks`),
        computed once and kept on the request (tokens are only ever appended)."""
        hashes = request.block_hashes
        full = request.num_known_tokens // self.block_size  # a pending token's id is not known yet
        want = full if num_blocks is None else min(num_blocks, full)
        if len(hashes) < want:
            tokens, bs = request.all_token_ids, self.block_size
            parent = hashes[-1] if hashes else NONE_HASH
            extra = request_extra_keys(request)
            for i in range(len(hashes), want):
                parent = hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs], extra if i == 0 else ())
                hashes.append(parent)
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request's full blocks: (block ids, tokens they hold).

        Never all of the request's tokens: the last one must run through the model to produce the
        logits of the next token, so the hit is at most `num_tokens - 1` rounded down to a block
        boundary (a prompt that is all cached recomputes its last block, as vLLM does). Nothing is
        reserved: pass the blocks to `allocate_slots` in the same scheduling pass.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for block_hash in self.block_hashes(request, max_blocks)[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hit.append(block.block_id)
        return hit, len(hit) * self.block_size

    # ---- allocation -------------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of `request`, after its
        `num_computed_tokens` plus the tokens of `new_computed_blocks` (cache hits from
        `get_computed_blocks`, which this call takes a reference on). False, and no change, if the
        free blocks do not suffice.

        Full blocks among the tokens computed once this step has run are registered in the
        prefix cache.
        """
        rid = request.request_id
        table = self.block_tables.get(rid)
        if table is not None and not new_computed_blocks:
            # The common decode step: the new tokens fit in the blocks the request holds.
            end = request.num_computed_tokens + num_new_tokens
            if end <= len(table) * self.block_size:
                if self.enable_prefix_caching:
                    self._cache_full_blocks(request, min(end, request.num_known_tokens))
                return True
        table = [] if table is None else table
        hits = [self.block_pool.blocks[b] for b in new_computed_blocks or ()]
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens) - len(table) - len(hits)
        # Hit blocks that sit in the free queue stop being free when taken.
        available = self.block_pool.num_free - sum(1 for b in hits if b.ref_cnt == 0)
        if need > available:
            return False
        if rid not in self.block_tables:
            self.block_tables[rid] = table
            self._num_cached_blocks[rid] = 0
        if hits:
            self.block_pool.touch(hits)
            table.extend(b.block_id for b in hits)
            self._num_cached_blocks[rid] += len(hits)
        if need > 0:
            table.extend(b.block_id for b in self.block_pool.get_new_blocks(need))
        if self.enable_prefix_caching:
            # Draft tokens beyond num_tokens may be rejected, and the ids of pending tokens (async
            # scheduling) are not known yet: only known tokens make a block full. Blocks passed over
            # here are registered by a later call, once their tokens are known.
            self._cache_full_blocks(request, min(num_computed + num_new_tokens, request.num_known_tokens))
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        rid = request.request_id
        first = self._num_cached_blocks[rid]
        num_full = num_tokens // self.block_size
        if num_full <= first:
            return
        hashes = self.block_hashes(request, num_full)
        table = self.block_tables[rid]
        for i in range(first, num_full):
            self.block_pool.cache_block(self.block_pool.blocks[table[i]], hashes[i])
        self._num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks; cached ones stay reusable until evicted. Freed tail
        first, so the end of the sequence is evicted before its start."""
        if self.enable_prefix_caching and request.request_id in self.block_tables:
            # Blocks whose last token became known after their step was scheduled (async scheduling:
            # the input of the final decode) are registered now, as the synchronous engine would have.
            self._cache_full_blocks(request, min(request.num_computed_tokens, request.num_known_tokens))
        table = self.block_tables.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if table:
            self.block_pool.free_blocks([self.block_pool.blocks[b] for b in reversed(table)])

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]

    def reset_prefix_cache(self) -> bool:
        """Drop all cached blocks (benchmarks); False while any request holds blocks."""
        return self.block_pool.reset_prefix_cache()
