"""The pool of physical KV-cache blocks: reference counts, the LRU free queue, the prefix cache.

Every block is always in exactly one of three states:

- **in use**: ``ref_cnt > 0`` (one count per request whose block table holds it); not in the
  free queue;
- **free and cached**: ``ref_cnt == 0``, in the free queue, still holding its ``block_hash`` and
  listed in the hash map, so a later request with the same prefix can revive it (``touch``);
- **free and empty**: ``ref_cnt == 0``, in the free queue, no hash.

Freed blocks go to the free queue's tail and new blocks are taken from its head, so the least
recently freed block is reused first, and only then does its cached hash get dropped (evicted).
Block 0 is the null block: never handed out, so block-table padding can point at it.

All operations are O(1) per block touched; nothing walks the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

EvictListener = Callable[[bytes, int], None]  # (block_hash, block_id)


class CacheEventSink(Protocol):
    """Told what the prefix cache gained and lost (engine/kv_events.py publishes it)."""

    def stored(self, block_hashes: list[bytes], parent: bytes | None, token_ids: list[int],
               block_size: int) -> None: ...

    def removed(self, block_hash: bytes) -> None: ...

    def cleared(self) -> None: ...


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full, computed and registered
    # Intrusive links of the free queue: no per-node allocation, O(1) removal from the middle.
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None
    is_null: bool = False

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list of free blocks between two sentinels; head = next to be reused."""

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        self.append_n(blocks)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks, {self.num_free_blocks} free")
        return [self.popleft() for _ in range(n)]

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None  # "not linked" doubles as "not free"
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free, block.next_free = last, self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            self.append(block)

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Head to tail (reuse order). For tests and debugging, not the hot path."""
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_evict: EvictListener | None = None) -> None:
        if num_blocks < 2:
            raise ValueError("need at least 2 blocks (block 0 is the null block)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # Called when a cached block's hash is dropped because the block is being reused, before
        # the new owner writes to it: a storage tier can copy the block's bytes out (the next
        # forward pass is what overwrites them).
        self.on_evict = on_evict
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.is_null = True
        self.free_block_queue = FreeBlockQueue(self.blocks[1:])
        # Invariant: block.block_hash is not None  <=>  cached_blocks[block.block_hash] is block.
        self.cached_blocks: dict[bytes, KVCacheBlock] = {}
        self.events: CacheEventSink | None = None  # KV events (engine/kv_events.py), when enabled

    # ---- allocation ------------------------------------------------------------------------

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Pop ``n`` blocks from the free queue's head (LRU), evicting their cached hashes."""
        blocks = self.free_block_queue.popleft_n(n)
        for block in blocks:
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
        return blocks

    def _evict(self, block: KVCacheBlock) -> None:
        block_hash, block.block_hash = block.block_hash, None
        del self.cached_blocks[block_hash]
        if self.events is not None:
            self.events.removed(block_hash)
        if self.on_evict is not None:
            self.on_evict(block_hash, block.block_id)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-hit blocks; a free (cached) block is revived out of the queue."""
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; those reaching zero join the queue's tail in order.

        They keep their hash, so they stay hittable until the LRU order reaches them.
        """
        for block in blocks_in_eviction_order:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and not block.is_null:
                self.free_block_queue.append(block)

    # ---- prefix cache ----------------------------------------------------------------------

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash) if self.enable_caching else None

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[bytes],
                          start: int, end: int) -> list[int]:
        """Register ``blocks[start:end]`` (full, computed) under ``block_hashes[start:end]``;
        returns the indices that became cached (not prefix hits, not duplicates)."""
        stored: list[int] = []
        if not self.enable_caching:
            return stored
        for i in range(start, end):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is not None or block.is_null:
                continue  # a prefix hit: already registered under this very hash
            # Two requests that computed the same prefix concurrently own equal blocks; the first
            # registered stays canonical and the duplicate stays a plain block, so the map keeps
            # one block per hash and eviction never has to pick among copies.
            if block_hash not in self.cached_blocks:
                self.cached_blocks[block_hash] = block
                block.block_hash = block_hash
                stored.append(i)
        return stored

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (e.g. after a weight update). Refused while blocks are in use,
        because their owners still count them as cached. Does not call ``on_evict``: this is an
        invalidation, and the blocks' contents must not be saved anywhere."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        if self.events is not None:
            self.events.cleared()
        return True

    # ---- accounting ------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the usable (non-null) blocks held by requests."""
        return (self.num_blocks - 1 - self.num_free_blocks) / (self.num_blocks - 1)
