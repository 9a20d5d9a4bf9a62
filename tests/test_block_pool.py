"""BlockPool and FreeBlockQueue on their own: LRU order, revival, eviction, the null block.

Every scenario ends with the pool clean: all reference counts zero, every usable block free.
"""

from __future__ import annotations

import pytest

from engine.block_hash import hash_block, model_hash_seed
from engine.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock

SEED = model_hash_seed("test-model", "float32", 4, "test")


def h(i: int) -> bytes:
    """A distinct, valid block hash per integer."""
    return hash_block(SEED, [i])


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def check_invariants(pool: BlockPool) -> None:
    queued = {b.block_id for b in pool.free_block_queue}
    assert len(queued) == pool.num_free_blocks
    assert 0 not in queued and pool.null_block.ref_cnt == 0
    for block in pool.blocks[1:]:
        assert block.ref_cnt >= 0
        assert (block.ref_cnt == 0) == (block.block_id in queued)
        if block.block_hash is not None:
            assert pool.cached_blocks[block.block_hash] is block
    assert all(b.block_hash == k for k, b in pool.cached_blocks.items())


def assert_clean(pool: BlockPool) -> None:
    check_invariants(pool)
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert pool.num_free_blocks == pool.num_blocks - 1
    assert pool.usage == 0.0


# ---- FreeBlockQueue --------------------------------------------------------------------------

def test_free_queue_pops_in_append_order_and_removes_from_the_middle():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5
    q.remove(blocks[2])
    assert ids(q) == [0, 1, 3, 4]
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append_n([blocks[0]])
    assert ids(q) == [1, 3, 4, 2, 0]
    assert ids(q.popleft_n(5)) == [1, 3, 4, 2, 0]
    assert len(q) == 0
    with pytest.raises(ValueError):
        q.popleft()


def test_free_queue_rejects_removing_a_block_it_does_not_hold():
    q = FreeBlockQueue([KVCacheBlock(0)])
    with pytest.raises(ValueError):
        q.remove(KVCacheBlock(1))
    with pytest.raises(ValueError):
        q.popleft_n(2)
    assert len(q) == 1


# ---- BlockPool -------------------------------------------------------------------------------

def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(4)
    assert sorted(ids(blocks)) == [1, 2, 3, 4]
    assert pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    assert_clean(pool)


def test_new_blocks_have_one_reference_and_leave_the_free_queue():
    pool = BlockPool(8)
    blocks = pool.get_new_blocks(3)
    assert ids(blocks) == [1, 2, 3]  # fresh pool: ascending ids
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 4
    check_invariants(pool)
    pool.free_blocks(blocks)
    assert_clean(pool)


def test_least_recently_freed_block_is_reused_first():
    pool = BlockPool(7)
    a, b = pool.get_new_blocks(3), pool.get_new_blocks(3)
    pool.free_blocks(reversed(b))  # b first, tail first: 6, 5, 4
    pool.free_blocks(reversed(a))  # then a: 3, 2, 1
    assert ids(pool.get_new_blocks(6)) == [6, 5, 4, 3, 2, 1]
    pool.free_blocks(pool.blocks[1:])
    assert_clean(pool)


def test_freed_block_keeps_its_hash_until_reused_then_evict_listener_fires():
    evicted = []
    pool = BlockPool(3, on_evict=lambda block_hash, block_id: evicted.append((block_hash, block_id)))
    [x, y] = pool.get_new_blocks(2)
    pool.cache_full_blocks([x, y], [h(0), h(1)], 0, 2)
    pool.free_blocks([x, y])
    assert pool.get_cached_block(h(0)) is x and pool.get_cached_block(h(1)) is y
    assert evicted == []
    [z] = pool.get_new_blocks(1)
    assert z is x and z.block_hash is None
    assert evicted == [(h(0), x.block_id)]
    assert pool.get_cached_block(h(0)) is None and pool.get_cached_block(h(1)) is y
    check_invariants(pool)
    pool.free_blocks([z])
    assert_clean(pool)


def test_touch_revives_a_freed_cached_block_without_double_counting():
    pool = BlockPool(4)
    [x] = pool.get_new_blocks(1)
    pool.cache_full_blocks([x], [h(7)], 0, 1)
    pool.free_blocks([x])
    assert pool.num_free_blocks == 3
    pool.touch([pool.get_cached_block(h(7))])  # a prefix hit on a free block
    assert x.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.touch([x])  # a second request hitting the same, now in-use block
    assert x.ref_cnt == 2 and pool.num_free_blocks == 2
    check_invariants(pool)
    pool.free_blocks([x])
    assert pool.num_free_blocks == 2  # still held by one request
    pool.free_blocks([x])
    assert x.block_hash == h(7)
    assert_clean(pool)


def test_double_free_is_an_error():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    with pytest.raises(ValueError):
        pool.free_blocks(blocks)
    assert_clean(pool)


def test_duplicate_block_of_an_already_cached_hash_stays_uncached():
    pool = BlockPool(4)
    [a], [b] = pool.get_new_blocks(1), pool.get_new_blocks(1)
    pool.cache_full_blocks([a], [h(1)], 0, 1)
    pool.cache_full_blocks([b], [h(1)], 0, 1)
    assert pool.get_cached_block(h(1)) is a and b.block_hash is None
    check_invariants(pool)
    pool.free_blocks([a, b])
    assert_clean(pool)


def test_cache_full_blocks_registers_only_the_given_range():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(4)
    hashes = [h(i) for i in range(4)]
    pool.cache_full_blocks(blocks, hashes, 1, 3)
    assert [b.block_hash for b in blocks] == [None, h(1), h(2), None]
    pool.free_blocks(blocks)
    assert_clean(pool)


def test_caching_disabled_never_registers_or_finds_blocks():
    pool = BlockPool(4, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [h(0), h(1)], 0, 2)
    assert pool.get_cached_block(h(0)) is None and pool.cached_blocks == {}
    pool.free_blocks(blocks)
    assert_clean(pool)


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use():
    evicted = []
    pool = BlockPool(4, on_evict=lambda *a: evicted.append(a))
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [h(0), h(1)], 0, 2)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h(0)) is blocks[0]
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h(0)) is None and all(b.block_hash is None for b in pool.blocks)
    assert evicted == []  # an invalidation is not an eviction: nothing is saved
    assert_clean(pool)
