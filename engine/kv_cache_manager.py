"""Which KV-cache blocks each request owns: the scheduler's only door to the block pool.

One request's life here:

1. ``get_computed_blocks`` (first scheduling only): the longest run of cached full blocks at the
   start of its tokens — the prefix-cache hit.
2. ``allocate_slots``: take references on those hit blocks, then allocate fresh blocks for the
   rest of this step's tokens (and for tokens a KV connector will load). Called again every step
   to grow the block table; all-or-nothing, so the scheduler can preempt and retry.
3. ``cache_blocks`` after the runner computed tokens: blocks that just became full and fully
   computed are registered under their chained hash, so later requests hit them.
4. ``free``: drop the request's references, tail block first, so a sequence's tail is evicted
   before its head (a shared head is what other requests are likeliest to hit).

Per-step cost is proportional to the blocks added in that step, never to the sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.block_hash import extend_block_hashes
from engine.block_pool import BlockPool, EvictListener, KVCacheBlock
from engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, hash_seed: bytes,
                 *, on_evict: EvictListener | None = None) -> None:
        self.block_size = block_size
        self.enable_caching = enable_prefix_caching
        self.hash_seed = hash_seed
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching, on_evict)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Block ids kept beside the blocks so get_block_ids is one C-level list copy per step
        # instead of a Python loop over the whole block table.
        self._req_to_block_ids: dict[str, list[int]] = {}
        # How many leading blocks of each request are registered in the prefix cache already.
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        self._lookups_counted: set[str] = set()  # requests whose lookup is in the stats already

    # ---- prefix hits -----------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Cached blocks covering the longest prefix of the request, and the tokens they hold.

        Does not take references (``allocate_slots`` does, if the request is admitted).
        """
        # Hashes are kept even without local caching: connectors and tiers key blocks by them.
        extend_block_hashes(request, self.block_size, self.hash_seed)
        if not self.enable_caching or request.num_computed_tokens > 0:
            return [], 0
        # At least one token must be computed: the model needs the last token's logits. For a
        # fresh request num_tokens is the prompt; after preemption its outputs are prefix too.
        max_hit_blocks = max(0, request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break  # chained hashes: nothing after a miss can hit
            blocks.append(block)
        num_hit_tokens = len(blocks) * self.block_size
        # A request that waits for free blocks is looked up again every step: count it once.
        if request.request_id not in self._lookups_counted:
            self._lookups_counted.add(request.request_id)
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_tokens
        return blocks, num_hit_tokens

    # ---- allocation ------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (), num_external_computed_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Make the request own blocks for all its computed tokens plus ``num_new_tokens``.

        Tokens covered: already computed + prefix hits (``new_computed_blocks``) + tokens a
        connector will load (``num_external_computed_tokens``, written into fresh blocks) + new.
        Returns the freshly allocated blocks, or None with no state change if the pool is short.
        """
        rid = request.request_id
        owned = self.req_to_blocks.get(rid)
        if new_computed_blocks and owned:
            raise ValueError(f"prefix hits for {rid}, which already owns blocks")
        num_owned = len(owned) if owned else 0
        num_tokens = (request.num_computed_tokens + len(new_computed_blocks) * self.block_size
                      + num_external_computed_tokens + num_new_tokens)
        num_required = -(-num_tokens // self.block_size)
        num_new_blocks = max(0, num_required - num_owned - len(new_computed_blocks))
        # A hit block with no owner sits in the free queue; reviving it uses up a free block.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.block_pool.num_free_blocks:
            return None

        if owned is None:
            owned = self.req_to_blocks[rid] = []
            self._req_to_block_ids[rid] = []
            self._num_cached_blocks[rid] = 0
        block_ids = self._req_to_block_ids[rid]
        if new_computed_blocks:
            # Touch before allocating: otherwise get_new_blocks could evict a hit block from the
            # free queue and hand it out as a fresh block.
            self.block_pool.touch(new_computed_blocks)
            owned.extend(new_computed_blocks)
            block_ids.extend(b.block_id for b in new_computed_blocks)
            self._num_cached_blocks[rid] = len(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks else []
        owned.extend(new_blocks)
        block_ids.extend(b.block_id for b in new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are now full and fully computed."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        if blocks is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        num_cached = self._num_cached_blocks[rid]
        if num_full <= num_cached:
            return  # the common decode step: nothing became full
        extend_block_hashes(request, self.block_size, self.hash_seed)
        stored = self.block_pool.cache_full_blocks(blocks, request.block_hashes, num_cached, num_full)
        self._num_cached_blocks[rid] = num_full
        if stored and self.block_pool.events is not None:
            self._report_stored(request, stored)

    def _report_stored(self, request: Request, stored: list[int]) -> None:
        """One BlockStored per run of consecutive newly cached blocks, with their tokens."""
        bs, hashes, tokens = self.block_size, request.block_hashes, request.prompt_token_ids
        if stored[-1] * bs + bs > len(tokens):
            tokens = tokens + request.output_token_ids
        run = [stored[0]]
        for i in stored[1:] + [None]:
            if i is not None and i == run[-1] + 1:
                run.append(i)
                continue
            first, last = run[0], run[-1]
            self.block_pool.events.stored([hashes[j] for j in run], hashes[first - 1] if first else None,
                                          list(tokens[first * bs:(last + 1) * bs]), bs)
            run = [i]

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, and forget it. Safe to call twice."""
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self._req_to_block_ids.pop(rid, None)
        self._num_cached_blocks.pop(rid, None)
        self._lookups_counted.discard(rid)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    # ---- queries ---------------------------------------------------------------------------

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy: callers may keep it across steps)."""
        ids = self._req_to_block_ids.get(request_id)
        return list(ids) if ids is not None else []

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        return list(self.req_to_blocks.get(request_id, ()))

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; refused (False) while any request holds blocks."""
        return self.block_pool.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        queries = self.prefix_cache_queries
        return {
            "num_blocks": self.block_pool.num_blocks,
            "num_free_blocks": self.num_free_blocks,
            "usage": self.usage,
            "prefix_cache_queries": queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_hit_rate": self.prefix_cache_hits / queries if queries else 0.0,
        }
