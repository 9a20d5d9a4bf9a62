"""KVCacheManager without a model: allocation, prefix hits, LRU eviction, chained block hashes.

Helpers build a manager with N blocks and requests with a given shared-prefix length; a "step"
is allocate_slots + advancing num_computed_tokens + cache_blocks, as the scheduler does. Every
scenario ends with the pool clean: all reference counts zero, every usable block free.
"""

from __future__ import annotations

import random

from engine.block_hash import (
    block_hash_from_hex, block_hash_to_hex, extend_block_hashes, hash_block, model_hash_seed,
)
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4
SEED = model_hash_seed("test-model", "float32", BS, "test")
PREFIX = list(range(500, 600))  # the shared system prompt all "prefix" requests start with


def make_manager(num_blocks: int = 16, caching: bool = True, on_evict=None) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, caching, SEED, on_evict=on_evict)


def make_request(rid: str, num_tokens: int, shared_prefix_len: int = 0) -> Request:
    """``shared_prefix_len`` tokens of PREFIX, then tokens unique to ``rid``."""
    unique = [10_000 + 100 * sum(map(ord, rid)) + i for i in range(num_tokens - shared_prefix_len)]
    return Request(rid, PREFIX[:shared_prefix_len] + unique, SamplingParams())


def run_prefill(kv: KVCacheManager, req: Request) -> tuple[int, list]:
    """Admit a request and compute its whole prompt in one step; return (hit tokens, new blocks)."""
    hit_blocks, num_hit = kv.get_computed_blocks(req)
    new_blocks = kv.allocate_slots(req, req.num_tokens - num_hit, hit_blocks)
    assert new_blocks is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req, req.num_computed_tokens)
    return num_hit, new_blocks


def check_invariants(kv: KVCacheManager) -> None:
    pool = kv.block_pool
    queued = {b.block_id for b in pool.free_block_queue}
    assert len(queued) == pool.num_free_blocks and 0 not in queued
    refs = [0] * pool.num_blocks
    for rid, blocks in kv.req_to_blocks.items():
        assert kv.get_block_ids(rid) == [b.block_id for b in blocks]
        assert len({b.block_id for b in blocks}) == len(blocks)  # no block twice in one table
        for b in blocks:
            refs[b.block_id] += 1
    for block in pool.blocks:
        assert block.ref_cnt == refs[block.block_id]  # exactly one reference per owning request
        assert (block.ref_cnt == 0) == (block.block_id in queued or block.is_null)
        if block.block_hash is not None:
            assert pool.cached_blocks[block.block_hash] is block


def assert_clean(kv: KVCacheManager) -> None:
    check_invariants(kv)
    assert kv.req_to_blocks == {}
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert kv.num_free_blocks == kv.stats()["num_blocks"] - 1
    assert kv.usage == 0.0


# ---- allocation ------------------------------------------------------------------------------

def test_allocation_and_free_counts():
    kv = make_manager(10)
    req = make_request("a", 10)
    new = kv.allocate_slots(req, 10)
    assert [b.block_id for b in new] == [1, 2, 3]
    assert kv.get_block_ids("a") == [1, 2, 3] and kv.num_free_blocks == 6
    assert kv.usage == 3 / 9
    kv.free(req)
    kv.free(req)  # idempotent: a second free is a no-op
    assert_clean(kv)


def test_decode_allocates_a_block_only_at_a_block_boundary():
    kv = make_manager(8)
    req = make_request("a", 6)
    run_prefill(kv, req)  # 6 tokens: 2 blocks
    grown = []
    for token in range(5):  # tokens 7..11
        req.output_token_ids.append(token)
        grown.append(len(kv.allocate_slots(req, 1)))
        req.num_computed_tokens += 1
        kv.cache_blocks(req, req.num_computed_tokens)
    assert grown == [0, 0, 1, 0, 0]  # the 9th token opens block 3
    assert len(req.block_hashes) == 2 and len(kv.get_block_ids("a")) == 3
    kv.free(req)
    assert_clean(kv)


def test_get_block_ids_returns_a_copy():
    kv = make_manager(8)
    req = make_request("a", 4)
    kv.allocate_slots(req, 4)
    ids = kv.get_block_ids("a")
    ids.append(99)
    assert kv.get_block_ids("a") == [1] and kv.get_block_ids("nobody") == []
    kv.free(req)
    assert_clean(kv)


def test_allocate_slots_returns_none_without_side_effects_when_short():
    kv = make_manager(6)  # 5 usable blocks
    a = make_request("a", 12)
    run_prefill(kv, a)  # 3 blocks, all cached
    kv.free(a)
    b = make_request("b", 8)
    kv.allocate_slots(b, 8)  # takes the 2 never-used blocks; a's 3 stay free and cached
    c = make_request("c", 12 + 8)
    c.prompt_token_ids[:12] = a.prompt_token_ids  # c hits all of a's blocks
    hits, num_hit = kv.get_computed_blocks(c)
    assert num_hit == 12
    before = ([(blk.block_id, blk.ref_cnt, blk.block_hash) for blk in kv.block_pool.blocks],
              [blk.block_id for blk in kv.block_pool.free_block_queue], dict(kv.req_to_blocks))
    # 3 free blocks, all of them c's hits: reviving them leaves none for c's 2 new blocks.
    assert kv.allocate_slots(c, c.num_tokens - num_hit, hits) is None
    after = ([(blk.block_id, blk.ref_cnt, blk.block_hash) for blk in kv.block_pool.blocks],
             [blk.block_id for blk in kv.block_pool.free_block_queue], dict(kv.req_to_blocks))
    assert after == before and "c" not in kv.req_to_blocks
    kv.free(b)
    assert_clean(kv)


def test_reviving_a_hit_counts_against_the_free_blocks():
    kv = make_manager(5)  # 4 usable
    a = make_request("a", 8, shared_prefix_len=8)
    run_prefill(kv, a)
    kv.free(a)  # both blocks free but cached
    b = make_request("b", 9 + 8, shared_prefix_len=8)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    # 4 free blocks: 2 revived hits + 3 new for 9 tokens = 5 > 4.
    assert kv.allocate_slots(b, 9, hits) is None
    assert kv.allocate_slots(b, 8, hits) is not None  # 2 revived + 2 new = 4: fits exactly
    assert kv.num_free_blocks == 0
    kv.free(b)
    assert_clean(kv)


def test_external_tokens_get_fresh_blocks_after_the_local_hits():
    kv = make_manager(16)
    a = make_request("a", 9, shared_prefix_len=9)
    run_prefill(kv, a)
    b = make_request("b", 21, shared_prefix_len=9)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    new = kv.allocate_slots(b, 0, hits, num_external_computed_tokens=8)  # async load, nothing to run yet
    assert len(new) == 2
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    b.num_computed_tokens = 16  # the load finished
    kv.cache_blocks(b, b.num_computed_tokens)
    assert [blk.block_hash for blk in new] == b.block_hashes[2:4]
    assert len(kv.allocate_slots(b, 5)) == 2  # the rest of the prompt: tokens 17..21
    kv.free(a)
    kv.free(b)
    assert_clean(kv)


# ---- prefix caching --------------------------------------------------------------------------

def test_shared_prefix_hits_the_same_blocks_and_only_full_blocks():
    kv = make_manager(16)
    a = make_request("a", 14, shared_prefix_len=10)
    assert run_prefill(kv, a)[0] == 0
    b = make_request("b", 13, shared_prefix_len=10)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8  # 10 shared tokens = 2 full blocks; the third block differs
    assert [blk.block_id for blk in hits] == kv.get_block_ids("a")[:2]
    kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert [blk.ref_cnt for blk in hits] == [2, 2]
    kv.free(a)
    kv.free(b)
    assert_clean(kv)


def test_prefix_hit_revives_a_freed_cached_block():
    kv = make_manager(8)
    a = make_request("a", 12, shared_prefix_len=12)
    run_prefill(kv, a)
    a_ids = kv.get_block_ids("a")
    kv.free(a)
    assert kv.num_free_blocks == 7
    b = make_request("b", 13, shared_prefix_len=12)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 12 and [blk.block_id for blk in hits] == a_ids
    kv.allocate_slots(b, 1, hits)
    assert kv.num_free_blocks == 7 - 3 - 1  # 3 revived, 1 new: each counted once
    assert [blk.ref_cnt for blk in hits] == [1, 1, 1]
    kv.free(b)
    assert_clean(kv)


def test_a_prompt_of_whole_blocks_recomputes_its_last_block():
    kv = make_manager(8)
    a = make_request("a", 16, shared_prefix_len=16)
    run_prefill(kv, a)
    b = make_request("b", 16, shared_prefix_len=16)  # identical prompt, 4 full blocks
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 12 and len(hits) == 3  # at most (16 - 1) // 4 blocks: one token is left
    kv.allocate_slots(b, 4, hits)
    kv.free(a)
    kv.free(b)
    assert_clean(kv)


def test_cache_blocks_registers_only_fully_computed_blocks():
    kv = make_manager(8)
    a = make_request("a", 12, shared_prefix_len=12)
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 7  # a chunk: block 0 full, block 1 half computed
    kv.cache_blocks(a, a.num_computed_tokens)
    assert len(kv.block_pool.cached_blocks) == 1
    b = make_request("b", 12, shared_prefix_len=12)
    assert kv.get_computed_blocks(b)[1] == 4
    kv.free(a)
    assert_clean(kv)


def test_freed_blocks_are_reused_lru_tail_first_and_eviction_is_reported():
    evicted = []
    kv = make_manager(7, on_evict=lambda block_hash, block_id: evicted.append((block_hash, block_id)))
    a, b = make_request("a", 12), make_request("b", 12)
    run_prefill(kv, a)
    run_prefill(kv, b)
    a_ids, b_ids = kv.get_block_ids("a"), kv.get_block_ids("b")
    kv.free(a)  # freed first: reused first, its tail before its head
    kv.free(b)
    c = make_request("c", 16)
    new = kv.allocate_slots(c, 16)
    assert [blk.block_id for blk in new] == a_ids[::-1] + b_ids[-1:]
    assert evicted == [(a.block_hashes[i], a_ids[i]) for i in (2, 1, 0)] + [(b.block_hashes[2], b_ids[2])]
    assert kv.get_computed_blocks(make_request("a", 12))[1] == 0  # a's prefix is gone
    assert kv.get_computed_blocks(make_request("b", 12))[1] == 8  # b's head survives
    kv.free(c)
    assert_clean(kv)


def test_hit_rate_is_counted_in_tokens():
    kv = make_manager(16)
    a = make_request("a", 10, shared_prefix_len=10)
    run_prefill(kv, a)
    run_prefill(kv, b := make_request("b", 10, shared_prefix_len=10))
    stats = kv.stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (20, 8)
    assert stats["prefix_cache_hit_rate"] == 8 / 20
    kv.free(a)
    kv.free(b)
    assert_clean(kv)


def test_caching_disabled_never_hits_but_still_names_blocks():
    kv = make_manager(8, caching=False)
    a = make_request("a", 8, shared_prefix_len=8)
    run_prefill(kv, a)
    b = make_request("b", 9, shared_prefix_len=8)
    assert kv.get_computed_blocks(b) == ([], 0)
    assert b.block_hashes == a.block_hashes  # connectors and tiers still get keys
    kv.free(a)
    assert_clean(kv)


def test_reset_prefix_cache_forgets_cached_prefixes():
    kv = make_manager(8)
    a = make_request("a", 8, shared_prefix_len=8)
    run_prefill(kv, a)
    assert kv.reset_prefix_cache() is False  # a still owns its blocks
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_request("b", 9, shared_prefix_len=8))[1] == 0
    assert_clean(kv)


# ---- block identity --------------------------------------------------------------------------

def test_same_prefix_gives_same_hashes_and_another_model_gives_others():
    a, b = make_request("a", 12, shared_prefix_len=12), make_request("b", 13, shared_prefix_len=12)
    extend_block_hashes(a, BS, SEED)
    extend_block_hashes(b, BS, SEED)
    assert len(a.block_hashes) == 3 and b.block_hashes == a.block_hashes
    other = make_request("c", 12, shared_prefix_len=12)
    extend_block_hashes(other, BS, model_hash_seed("other-model", "float32", BS, "test"))
    assert not set(other.block_hashes) & set(a.block_hashes)
    for field_change in [("test-model", "bfloat16", BS, "test"), ("test-model", "float32", 8, "test"),
                         ("test-model", "float32", BS, "other")]:
        assert model_hash_seed(*field_change) != SEED


def test_changing_one_token_changes_that_block_and_every_later_one():
    a, b = make_request("a", 16, shared_prefix_len=16), make_request("b", 16, shared_prefix_len=16)
    b.prompt_token_ids[9] += 1  # in block 2
    extend_block_hashes(a, BS, SEED)
    extend_block_hashes(b, BS, SEED)
    same = [x == y for x, y in zip(a.block_hashes, b.block_hashes)]
    assert same == [True, True, False, False]


def test_hashes_are_the_documented_chain_and_grow_incrementally():
    req = make_request("a", 6)
    extend_block_hashes(req, BS, SEED)
    assert req.block_hashes == [hash_block(SEED, req.prompt_token_ids[:4])]
    first = req.block_hashes[0]
    req.output_token_ids.extend([1, 2])  # completes block 1 across the prompt/output boundary
    extend_block_hashes(req, BS, SEED)
    assert req.block_hashes[0] is first  # earlier hashes are never recomputed
    assert req.block_hashes[1] == hash_block(first, req.all_token_ids[4:8])
    assert block_hash_from_hex(block_hash_to_hex(first)) == first and len(block_hash_to_hex(first)) == 64


def test_hashes_are_stable_across_processes():
    # Pinned values: a change here silently invalidates every tier and every peer's cache.
    assert model_hash_seed("m", "float16", 16, "L").hex()[:16] == PINNED_SEED_PREFIX
    assert hash_block(bytes(32), [1, 2, 3]).hex()[:16] == PINNED_BLOCK_PREFIX

PINNED_SEED_PREFIX = "7be5e22f16c87ea4"
PINNED_BLOCK_PREFIX = "ec3d413b143365a6"


# ---- randomized ------------------------------------------------------------------------------

def test_random_allocate_cache_free_sequences_keep_invariants():
    rng = random.Random(1234)
    kv = make_manager(24)
    # Simulated KV contents: block id -> the tokens last written into it. A prefix hit must
    # always serve blocks whose contents are exactly the request's tokens at those positions.
    contents: dict[int, list[int]] = {}
    running: dict[str, Request] = {}
    for step in range(600):
        op = rng.random()
        if op < 0.35 and len(running) < 6:
            rid = f"r{step}"
            req = make_request(rid, rng.randint(1, 40), shared_prefix_len=0)
            req.prompt_token_ids[:0] = PREFIX[: rng.choice([0, 3, 8, 13, 20])]
            hits, num_hit = kv.get_computed_blocks(req)
            assert num_hit < req.num_tokens
            for i, blk in enumerate(hits):
                assert contents[blk.block_id] == req.all_token_ids[i * BS:(i + 1) * BS]
            chunk = rng.randint(1, req.num_tokens - num_hit)
            if kv.allocate_slots(req, chunk, hits) is not None:
                req.num_computed_tokens = num_hit
                running[rid] = req
        elif op < 0.8 and running:
            req = running[rng.choice(sorted(running))]
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(rng.randint(0, 50))  # a decode step
            num_new = rng.randint(1, req.num_tokens - req.num_computed_tokens)
            if kv.allocate_slots(req, num_new) is None:
                kv.free(running.pop(req.request_id))  # "preempt"
            else:
                table, toks = kv.get_blocks(req.request_id), req.all_token_ids
                for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
                    blk = table[pos // BS].block_id
                    contents[blk] = contents.get(blk, [])[: pos % BS] + [toks[pos]]
                req.num_computed_tokens += num_new
                kv.cache_blocks(req, req.num_computed_tokens)
        elif running:
            kv.free(running.pop(rng.choice(sorted(running))))
        check_invariants(kv)
    assert kv.stats()["prefix_cache_hits"] > 0  # the scenario really exercised hits
    for req in running.values():
        kv.free(req)
    assert_clean(kv)


def test_a_request_waiting_for_blocks_is_counted_once_in_the_hit_rate():
    kv = KVCacheManager(4, 4, True, model_hash_seed("m", "float32", 4, "test"))
    req = Request("r", list(range(40)), SamplingParams(max_tokens=1), max_tokens=1)
    for _ in range(3):  # the scheduler asks again each step while the pool is too small
        kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, 40) is None
    assert kv.stats()["prefix_cache_queries"] == 40
    kv.free(req)
