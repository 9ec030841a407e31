"""KV-cache bookkeeping on the host: which blocks are free and which blocks each request owns.

The device tensors live in the model runner; this side only hands out block ids. Prefix caching
(block hashes, reference counts, LRU reuse) belongs here, behind the same `allocate_slots`/`free`.
"""

from __future__ import annotations

from collections import deque

from tokenmill.engine.request import Request


class BlockAllocator:
    """A free list of fixed-size block ids."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class KVCacheManager:
    """Per-request block tables over one `BlockAllocator`."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1 (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `request`. False (and no change) if the
        free blocks do not suffice."""
        table = self.block_tables.setdefault(request.request_id, [])
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(table)
        if need > self.allocator.num_free:
            if not table:
                del self.block_tables[request.request_id]
            return False
        if need > 0:
            table.extend(self.allocator.allocate(need))
        return True

    def free(self, request: Request) -> None:
        self.allocator.free(self.block_tables.pop(request.request_id, []))

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]
