"""The ``tiered`` connector (prefix reuse through CPU/disk tiers) and the ``multi`` connector that
chains it with a transfer connector, driven the way ``engine/scheduler.py`` drives a connector:
match → allocate → build meta → start load, and ``request_finished`` at the end. Every scenario
checks the bytes that land in the cache against the bytes that were saved, and that nothing is
left pinned."""

from __future__ import annotations

import json

import pytest
import torch

from kv_connector import KVConnectorBase, KVTransferConfig, create_connector, known_connectors

from tests.connector_fakes import BS, HashedRequest as FakeRequest, chain_hashes  # noqa: F401
LAYOUT = dict(block_size=BS, num_layers=2, num_kv_heads=2, head_dim=8, model_id="tiny")


def make(name: str = "tiered", extra: dict | None = None, role: str = "kv_both", num_blocks: int = 32,
         dtype: torch.dtype = torch.float32) -> KVConnectorBase:
    extra = {"cpu": {"capacity_bytes": 64 * block_bytes(dtype)}} if extra is None else extra
    conn = create_connector(KVTransferConfig(kv_connector=name, kv_role=role, kv_connector_extra_config=extra))
    shape = (num_blocks, LAYOUT["num_layers"], 2, BS, LAYOUT["num_kv_heads"], LAYOUT["head_dim"])
    conn.register_kv_cache(torch.randn(shape).to(dtype), {**LAYOUT, "dtype": str(dtype).removeprefix("torch.")})
    return conn


def block_bytes(dtype: torch.dtype = torch.float32) -> int:
    return LAYOUT["num_layers"] * 2 * BS * LAYOUT["num_kv_heads"] * LAYOUT["head_dim"] * dtype.itemsize


@pytest.fixture
def connectors():
    made: list[KVConnectorBase] = []

    def _make(*args, **kwargs) -> KVConnectorBase:
        made.append(make(*args, **kwargs))
        return made[-1]

    yield _make
    for c in made:
        c.shutdown()


def finish(conn, rid: str, prompt: list[int], block_ids: list[int], num_computed: int | None = None) -> None:
    req = FakeRequest(rid, prompt, num_computed_tokens=len(prompt) if num_computed is None else num_computed)
    assert conn.request_finished(req, block_ids) == (False, None)


def admit(conn, req: FakeRequest, block_ids: list[int], num_local: int = 0) -> int:
    """Match, allocate and load synchronously, as the scheduler and the engine step do."""
    n, is_async = conn.get_num_new_matched_tokens(req, num_local)
    assert not is_async
    conn.update_state_after_alloc(req, block_ids, n)
    conn.start_load_kv(conn.build_connector_meta({req.request_id: req.num_tokens - num_local - n}))
    return n


def tiers(conn):
    return conn.tiers


def assert_unpinned(conn) -> None:
    assert tiers(conn).cpu.stats()["pinned_blocks"] == 0


# ---- the tiered connector ----------------------------------------------------------------------------------


def test_tiered_and_multi_are_registered():
    assert {"tiered", "multi"} <= set(known_connectors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_saved_on_finish_load_into_other_blocks_with_equal_bytes(connectors, dtype):
    conn = connectors(dtype=dtype)
    prompt = list(range(100, 118))  # 4 full blocks and 2 tokens
    finish(conn, "a", prompt, [3, 5, 7, 9, 11])
    n = admit(conn, FakeRequest("b", prompt), [20, 21, 22, 23, 24])
    assert n == 16
    assert torch.equal(conn.kv_cache[20:24], conn.kv_cache[[3, 5, 7, 9]])
    assert not torch.equal(conn.kv_cache[24], conn.kv_cache[11])  # the partial block is not saved
    s = conn.stats()
    assert (s["saved_blocks"], s["loaded_blocks"], s["hit_tokens"]) == (4, 4, 16)
    assert s["loads"] == 1 and s["saves"] == 1
    assert_unpinned(conn)


def test_at_least_one_prompt_token_is_left_to_compute(connectors):
    conn = connectors()
    prompt = list(range(16))  # exactly 4 full blocks, all saved
    finish(conn, "a", prompt, [1, 2, 3, 4])
    assert admit(conn, FakeRequest("b", prompt), [10, 11, 12, 13]) == 12
    assert torch.equal(conn.kv_cache[10:13], conn.kv_cache[1:4])
    assert_unpinned(conn)


def test_the_match_starts_after_the_local_prefix_hits(connectors):
    conn = connectors()
    prompt = list(range(20))
    finish(conn, "a", prompt, [1, 2, 3, 4, 5])
    ids = [6, 7, 10, 11, 12]  # 6, 7: the engine's own prefix-cache hits
    before = conn.kv_cache[[6, 7]].clone()
    assert admit(conn, FakeRequest("b", prompt), ids, num_local=8) == 8
    assert torch.equal(conn.kv_cache[[10, 11]], conn.kv_cache[[3, 4]])
    assert torch.equal(conn.kv_cache[[6, 7]], before)


def test_a_missing_block_ends_the_match(connectors):
    conn = connectors()
    prompt = list(range(20))
    finish(conn, "a", prompt, [1, 2, 3, 4, 5])
    conn.tiers.cpu._slots.pop(FakeRequest("x", prompt).block_hashes[2])  # as if evicted
    assert admit(conn, FakeRequest("b", prompt), [10, 11, 12, 13, 14]) == 8


def test_a_different_prefix_matches_nothing(connectors):
    conn = connectors()
    finish(conn, "a", list(range(20)), [1, 2, 3, 4, 5])
    assert admit(conn, FakeRequest("b", [7] + list(range(1, 20))), [10, 11, 12, 13, 14]) == 0


def test_only_computed_full_blocks_are_saved(connectors):
    conn = connectors()
    prompt = list(range(20))
    finish(conn, "a", prompt, [1, 2, 3, 4, 5], num_computed=10)  # aborted mid-prefill
    assert conn.stats()["saved_blocks"] == 2
    assert admit(conn, FakeRequest("b", prompt), [10, 11, 12, 13, 14]) == 8


def test_blocks_the_tiers_hold_are_not_saved_again(connectors):
    conn = connectors()
    prompt = list(range(20))
    finish(conn, "a", prompt, [1, 2, 3, 4, 5])
    finish(conn, "b", prompt + [1, 2, 3, 4], [1, 2, 3, 4, 5, 6])
    assert conn.stats()["saved_blocks"] == 6


def test_an_evicted_cached_block_is_saved_before_it_is_overwritten(connectors):
    conn = connectors()
    prompt = list(range(8))
    hashes = FakeRequest("x", prompt).block_hashes
    expect = conn.kv_cache[[4, 5]].clone()
    conn.on_block_evicted(hashes[0], 4)
    conn.on_block_evicted(hashes[1], 5)
    conn.kv_cache[[4, 5]] = 0.0  # the engine reuses the blocks for other tokens
    assert admit(conn, FakeRequest("b", prompt + [99]), [8, 9, 10]) == 8
    assert torch.equal(conn.kv_cache[[8, 9]], expect)
    assert conn.stats()["evicted_blocks_saved"] == 2
    conn.on_block_evicted(hashes[0], 4)  # already held: no second copy
    assert conn.stats()["evicted_blocks_saved"] == 2


def test_matched_blocks_stay_pinned_until_loaded(connectors):
    conn = connectors(extra={"cpu": {"capacity_bytes": 2 * block_bytes()}})
    prompt = list(range(9))
    finish(conn, "a", prompt, [1, 2, 3])
    expect = conn.kv_cache[[1, 2]].clone()
    req = FakeRequest("b", prompt)
    n, _ = conn.get_num_new_matched_tokens(req, 0)
    assert n == 8
    finish(conn, "c", list(range(50, 59)), [5, 6, 7])  # would evict both, but they are pinned
    assert conn.stats()["tiers"]["cpu"]["rejected"] == 2
    conn.update_state_after_alloc(req, [10, 11, 12], n)
    conn.start_load_kv(conn.build_connector_meta({"b": 1}))
    assert torch.equal(conn.kv_cache[[10, 11]], expect)
    assert_unpinned(conn)


def test_a_request_that_ends_before_its_load_leaves_nothing_pinned(connectors):
    conn = connectors()
    prompt = list(range(9))
    finish(conn, "a", prompt, [1, 2, 3])
    for rid in ("b", "c", "d"):
        req = FakeRequest(rid, prompt)
        conn.get_num_new_matched_tokens(req, 0)
        conn.get_num_new_matched_tokens(req, 0)  # asked again after a failed allocation
        if rid == "c":
            conn.update_state_after_alloc(req, [10, 11, 12], 8)
        if rid == "d":
            conn.abort(rid)
        else:
            conn.request_finished(req, [])
    assert not conn.build_connector_meta({})
    assert_unpinned(conn)


def test_blocks_on_disk_survive_a_restart(tmp_path, connectors):
    extra = {"cpu": {"capacity_bytes": 2 * block_bytes()},
             "disk": {"path": str(tmp_path), "capacity_bytes": 1 << 20, "write_through": True}}
    first = make(extra=extra)
    prompt = list(range(21))
    finish(first, "a", prompt, [1, 2, 3, 4, 5, 6])
    saved = first.kv_cache[1:6].clone()
    first.shutdown()  # flushes the writes behind
    again = connectors(extra=extra)
    assert admit(again, FakeRequest("b", prompt), [10, 11, 12, 13, 14, 15]) == 20
    assert torch.equal(again.kv_cache[10:15], saved)
    s = again.stats()["tiers"]
    assert s["disk"]["hits"] == 5 and s["disk"]["recovered"] == 5
    assert_unpinned(again)


def test_stats_are_plain_json(connectors):
    conn = connectors()
    finish(conn, "a", list(range(9)), [1, 2, 3])
    s = json.loads(json.dumps(conn.stats()))
    assert s["connector"] == "tiered" and s["tiers"]["cpu"]["bytes_in"] == 2 * block_bytes()


# ---- the multi connector --------------------------------------------------------------------------------------


def multi_extra(cpu_blocks: int = 64) -> dict:
    return {"connectors": [
        {"kv_connector": "tiered", "kv_connector_extra_config": {"cpu": {"capacity_bytes": cpu_blocks * block_bytes()}}},
        {"kv_connector": "inproc"},
    ]}


def test_multi_loads_a_prefix_from_the_tiers_and_the_rest_from_the_producer(connectors):
    producer = connectors("inproc", {}, role="kv_producer")
    consumer = connectors("multi", multi_extra(), role="kv_consumer")
    prompt = list(range(22))  # 5 full blocks, 2 tokens
    # The consumer's tiers hold the first 2 blocks, from an earlier request with the same prefix.
    finish(consumer, "earlier", prompt[:8] + [0, 0, 0], [30, 31, 29])
    tier_bytes = consumer.kv_cache[[30, 31]].clone()
    remote = [2, 4, 6, 8, 10, 12]
    hold, params = producer.request_finished(
        FakeRequest("p", prompt, num_computed_tokens=22, kv_transfer_params={"do_remote_decode": True}), remote)
    assert hold
    req = FakeRequest("d", prompt, kv_transfer_params=json.loads(json.dumps(params)), output_token_ids=[5])
    n, is_async = consumer.get_num_new_matched_tokens(req, 0)
    assert (n, is_async) == (22, True)
    local = [13, 14, 15, 16, 17, 18]
    consumer.update_state_after_alloc(req, local, n)
    consumer.start_load_kv(consumer.build_connector_meta({}))
    assert consumer.get_finished() == (set(), {"d"}, {})
    assert torch.equal(consumer.kv_cache[[13, 14]], tier_bytes)  # from the tiers
    assert torch.equal(consumer.kv_cache[[15, 16, 17, 18]], producer.kv_cache[[6, 8, 10, 12]])  # pulled
    assert producer.get_finished()[0] == {"p"}
    s = consumer.stats()
    assert s["connectors"]["tiered"]["loaded_blocks"] == 2
    assert s["connectors"]["inproc"]["bytes_received"] == 4 * block_bytes()
    assert_unpinned(consumer.connectors[0])


def test_multi_holds_while_any_connector_holds_and_saves_to_the_tiers_too(connectors):
    producer = connectors("multi", multi_extra(), role="kv_producer")
    prompt = list(range(13))
    req = FakeRequest("p", prompt, num_computed_tokens=13, kv_transfer_params={"do_remote_decode": True},
                      status=None)
    hold, params = producer.request_finished(req, [1, 2, 3, 4])
    assert hold and params["kv_connector"] == "inproc" and params["remote_block_ids"] == [1, 2, 3, 4]
    assert producer.stats()["connectors"]["tiered"]["saved_blocks"] == 3
    assert producer.get_finished()[0] == set()  # still held for the consumer
    inproc = producer.connectors[1]
    inproc.holds.release("p", "done")
    assert producer.get_finished()[0] == {"p"}


def test_multi_without_a_remote_prefill_is_just_the_tiers(connectors):
    conn = connectors("multi", multi_extra())
    prompt = list(range(13))
    finish(conn, "a", prompt, [1, 2, 3, 4])
    n = admit(conn, FakeRequest("b", prompt), [5, 6, 7, 8])
    assert n == 12
    assert torch.equal(conn.kv_cache[[5, 6, 7]], conn.kv_cache[[1, 2, 3]])
    assert conn.get_finished() == (set(), set(), {})


def test_multi_forwards_evicted_blocks(connectors):
    conn = connectors("multi", multi_extra())
    h = FakeRequest("x", list(range(4))).block_hashes[0]
    conn.on_block_evicted(h, 3)
    assert conn.connectors[0].tiers.contains([h]) == [True]


def test_multi_needs_a_list_of_connectors():
    with pytest.raises(ValueError, match="connectors"):
        create_connector(KVTransferConfig(kv_connector="multi", kv_connector_extra_config={}))
