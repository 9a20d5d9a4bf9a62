"""Storage tiers under a real engine: a tier hit gives exactly the tokens a recompute gives, blocks
survive an engine restart on disk, blocks the prefix cache evicts are kept, and a disaggregated
prefill engine reuses a prefix from its tiers while handing the KV to a decode engine.

They rest on two engine hooks: ``Scheduler.schedule`` calls ``connector.update_state_after_alloc``
after every fresh request's allocation (synchronous loads included), and ``LLMEngine`` builds its
``KVCacheManager`` with ``on_evict=kv_connector.on_block_evicted``. An engine without the second
skips these tests with a note rather than failing them.
"""

from __future__ import annotations

import random

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from kv_connector import KVTransferConfig, create_connector
from tests.tiny_models import make_tiny_model_dir

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
FIRST_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir("tiny-llama", tmp_path_factory.mktemp("m") / "tiny-llama", seed=0)


def prompt(length: int, seed: int, vocab: int = 500) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def engine(tiny_dir, connector=None, **kw) -> LLMEngine:
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32", **kw), kv_connector=connector)
    if connector is not None and getattr(eng.kv_cache_manager.block_pool, "on_evict", None) is None:
        eng.shutdown()
        pytest.skip("LEAD: the engine does not hand its connector's on_block_evicted to the block pool "
                    "yet (see this module's docstring)")
    return eng


def tiered(disk_path=None, cpu_bytes: int = 64 << 20, role: str = "kv_both"):
    extra = {"cpu": {"capacity_bytes": cpu_bytes}}
    if disk_path is not None:
        extra["disk"] = {"path": str(disk_path), "capacity_bytes": 64 << 20, "write_through": True}
    return create_connector(KVTransferConfig(kv_connector="tiered", kv_role=role, kv_connector_extra_config=extra))


def run(eng: LLMEngine, requests: dict[str, list[int]], params: SamplingParams, **add_kw) -> dict:
    """Add every request and step until all finish (blocks held for a consumer may stay held)."""
    for rid, ids in requests.items():
        eng.add_request(rid, ids, params, **add_kw.get(rid, {}))
    done = {}
    while len(done) < len(requests):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if not eng.scheduler.running and not eng.scheduler.waiting:
            eng.wait_for_work()
    return done


def assert_no_leak(eng: LLMEngine) -> None:
    stats = eng.kv_cache_manager.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] - 1
    assert all(b.ref_cnt == 0 for b in eng.kv_cache_manager.block_pool.blocks)
    if eng.connector is not None and hasattr(eng.connector, "tiers"):
        assert eng.connector.tiers.cpu.stats()["pinned_blocks"] == 0


def test_a_tier_hit_after_a_restart_gives_the_same_tokens_as_recompute(tiny_dir, tmp_path):
    p = prompt(70, seed=1)
    ref = run(engine(tiny_dir), {"r": p}, GREEDY)["r"]
    first = engine(tiny_dir, tiered(tmp_path))
    run(first, {"r": p}, GREEDY)
    first.shutdown()
    again = engine(tiny_dir, tiered(tmp_path))  # a fresh engine: an empty prefix cache
    out = run(again, {"r": p}, GREEDY)["r"]
    assert out.num_cached_tokens == 64  # four full blocks; the last token is always computed
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    s = again.stats()["connector"]
    assert s["loaded_blocks"] == 4 and s["tiers"]["disk"]["hits"] == 4
    assert_no_leak(again)
    again.shutdown()


def test_a_prefix_the_prefix_cache_dropped_comes_back_from_the_tiers(tiny_dir):
    p = prompt(70, seed=2)
    ref = run(engine(tiny_dir), {"r": p}, GREEDY)["r"]
    eng = engine(tiny_dir, tiered(), num_kv_blocks=16, max_model_len=128)
    run(eng, {"a": p}, GREEDY)
    run(eng, {f"other{i}": prompt(100, seed=10 + i) for i in range(3)}, GREEDY)  # evicts a's blocks
    out = run(eng, {"b": p}, GREEDY)["b"]
    assert out.num_cached_tokens == 64
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert eng.stats()["connector"]["loaded_blocks"] >= 1
    assert_no_leak(eng)
    eng.shutdown()


def test_blocks_of_preempted_requests_are_saved_on_eviction_and_tokens_do_not_change(tiny_dir):
    prompts = {f"r{i}": prompt(40, seed=20 + i) for i in range(4)}
    ref = {rid: run(engine(tiny_dir), {rid: p}, GREEDY)[rid].outputs[0].token_ids for rid, p in prompts.items()}
    eng = engine(tiny_dir, tiered(), num_kv_blocks=13, max_model_len=128)
    outs = run(eng, prompts, GREEDY)
    assert eng.scheduler.num_preemptions > 0
    assert {rid: o.outputs[0].token_ids for rid, o in outs.items()} == ref
    assert eng.stats()["connector"]["evicted_blocks_saved"] > 0
    assert_no_leak(eng)
    eng.shutdown()


def test_a_disaggregated_prefill_reuses_a_prefix_from_its_tiers(tiny_dir):
    shared = prompt(64, seed=5)
    p1, p2 = shared + prompt(9, seed=6), shared + prompt(12, seed=7)
    ref = {rid: run(engine(tiny_dir), {rid: p}, GREEDY)[rid].outputs[0].token_ids
           for rid, p in (("r1", p1), ("r2", p2))}
    multi = create_connector(KVTransferConfig(kv_connector="multi", kv_role="kv_producer", kv_connector_extra_config={
        "connectors": [{"kv_connector": "tiered", "kv_connector_extra_config": {"cpu": {"capacity_bytes": 64 << 20}}},
                       {"kv_connector": "inproc"}]}))
    prefill = engine(tiny_dir, multi)
    decode = engine(tiny_dir, create_connector(KVTransferConfig(kv_connector="inproc", kv_role="kv_consumer")))
    cached = {}
    for rid, p in (("r1", p1), ("r2", p2)):
        pre = run(prefill, {rid: p}, FIRST_TOKEN, **{rid: {"kv_transfer_params": {"do_remote_decode": True}}})[rid]
        cached[rid] = pre.num_cached_tokens
        first = pre.outputs[0].token_ids
        # The proxy's sequence: the decode engine continues from the prefill's first token.
        add = {rid: {"kv_transfer_params": pre.kv_transfer_params, "output_token_ids": first}}
        out = run(decode, {rid: p}, GREEDY, **add)[rid]
        assert out.error is None
        assert out.outputs[0].token_ids == ref[rid]
        while prefill.has_work():  # the consumer's done frees the held blocks
            prefill.step()
        assert prefill.kv_cache_manager.reset_prefix_cache()  # only the tiers can serve r2's prefix
    assert cached == {"r1": 0, "r2": 64}
    assert_no_leak(prefill)
    assert_no_leak(decode)
    prefill.shutdown()
    decode.shutdown()
