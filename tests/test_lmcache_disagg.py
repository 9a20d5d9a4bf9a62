"""Prefill → decode through LMCache alone: a prefill engine and a decode engine whose only link is
one LMCache server (each runs the ``lmcache`` connector with the same ``remote_url``) give the
tokens of one colocated engine, the decode side loads the prompt instead of recomputing it (its
counters say so), and both block pools end clean. Real server process; the last test runs the
whole ``kvfabric up`` topology. Skipped where lmcache is not installed."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest
import torch

pytest.importorskip("lmcache.v1.cache_engine")

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kv_connector import KVTransferConfig, create_connector  # noqa: E402
from storage_tiers.lmcache_server import LMCacheServer  # noqa: E402
from tests.tiny_models import make_tiny_model_dir  # noqa: E402

BS = 16  # the engine's default block size
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# On the device machine: the engines' caches on the GPU (float32, so greedy tokens compare exactly).
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs CUDA")])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("tiny-qwen3", tmp_path_factory.mktemp("m") / "tiny-qwen3", seed=1)


@pytest.fixture(scope="module")
def server():
    with LMCacheServer.start() as s:
        yield s


def make_engine(model_dir, role=None, url=None, device="cpu"):
    conn = None
    if role is not None:
        conn = create_connector(KVTransferConfig(kv_connector="lmcache", kv_role=role, kv_connector_extra_config={
            "remote_url": url, "max_local_cpu_size": 0.05, "remote_retry_interval_s": 0.2}))
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device=device, max_num_batched_tokens=64,
                                  kv_cache_bytes=64 << 20), kv_connector=conn)


def run(engine, rid):
    for _ in range(10_000):
        for out in engine.step():
            if out.finished and out.request_id == rid:
                return out
    raise AssertionError("engine did not finish")


def prefill_then_decode(prefill, decode, rid, prompt, params=GREEDY):
    """What the proxy does: the prefill samples the first token, the decode continues from it."""
    prefill.add_request(rid, prompt, dataclasses.replace(params, max_tokens=1),
                        kv_transfer_params={"do_remote_decode": True})
    first = run(prefill, rid)
    assert first.kv_transfer_params["kv_connector"] == "lmcache"
    decode.add_request(rid, prompt, params, kv_transfer_params=first.kv_transfer_params,
                       output_token_ids=first.outputs[0].token_ids)
    return first, run(decode, rid)


def colocated_tokens(model_dir, prompts, params=GREEDY, device="cpu"):
    engine = make_engine(model_dir, device=device)
    try:
        out = []
        for i, p in enumerate(prompts):
            engine.add_request(f"c{i}", p, params)
            out.append(run(engine, f"c{i}").outputs[0].token_ids)
        return out
    finally:
        engine.shutdown()


def assert_pool_clean(engine):
    s = engine.stats()
    assert s["num_free_blocks"] == s["num_blocks"] - 1 and s["num_held_for_transfer"] == 0
    assert not engine.connector._matches and not engine.connector._loads
    assert not engine.connector.engine.lookup_pins


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_decode_loads_the_prefill_from_the_lmcache_server_and_equals_colocated(model_dir, server, device):
    rng = random.Random(0 if device == "cpu" else 1)  # fresh prompts: the server is shared by the module
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (37, 64, 23, 130)]
    expected = colocated_tokens(model_dir, prompts, device=device)
    prefill = make_engine(model_dir, "kv_producer", server.url, device)
    decode = make_engine(model_dir, "kv_consumer", server.url, device)
    try:
        for i, (prompt, want) in enumerate(zip(prompts, expected)):
            full = len(prompt) // BS * BS  # full prompt blocks: what the prefill stores
            before = decode.stats()["connector"]
            first, out = prefill_then_decode(prefill, decode, f"r{i}", prompt)
            assert first.kv_transfer_params["num_tokens"] == full
            assert out.outputs[0].token_ids == want
            after = decode.stats()["connector"]
            # Every stored token came from the server: loaded, not recomputed.
            assert after["remote_hit_tokens"] - before["remote_hit_tokens"] == full
            assert after["loaded_blocks"] - before["loaded_blocks"] == full // BS
            assert out.num_cached_tokens == full
        p, d = prefill.stats()["connector"], decode.stats()["connector"]
        assert (p["handoffs_sent"], d["handoffs_received"], d["handoff_missed_tokens"]) == (4, 4, 0)
        assert d["stored_chunks"] == 0 and d["remote_saved_blocks"] == 0  # a consumer never stores
        for e in (prefill, decode):
            assert_pool_clean(e)
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_a_prefill_that_ends_at_eos_hands_nothing_over(model_dir, server):
    prefill = make_engine(model_dir, "kv_producer", server.url)
    try:
        prompt = list(range(10, 50))
        prefill.add_request("probe", prompt, dataclasses.replace(GREEDY, max_tokens=1))
        first = run(prefill, "probe").outputs[0].token_ids[0]
        prefill.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=1, stop_token_ids=[first]),
                            kv_transfer_params={"do_remote_decode": True})
        out = run(prefill, "r")
        assert out.outputs[0].finish_reason == "stop" and out.kv_transfer_params is None
        assert_pool_clean(prefill)
    finally:
        prefill.shutdown()


def test_a_server_that_died_after_the_prefill_makes_decode_recompute_the_same_tokens(model_dir, caplog):
    prompt = [random.Random(5).randrange(3, 500) for _ in range(70)]
    [want] = colocated_tokens(model_dir, [prompt])
    srv = LMCacheServer.start()
    prefill = make_engine(model_dir, "kv_producer", srv.url)
    decode = make_engine(model_dir, "kv_consumer", srv.url)
    try:
        prefill.add_request("r", prompt, dataclasses.replace(GREEDY, max_tokens=1),
                            kv_transfer_params={"do_remote_decode": True})
        first = run(prefill, "r")
        assert first.kv_transfer_params["num_tokens"] == 64
        srv.stop()  # everything it held is gone
        with caplog.at_level(logging.WARNING, logger="kv_connector.lmcache_connector"):
            decode.add_request("r", prompt, GREEDY, kv_transfer_params=first.kv_transfer_params,
                               output_token_ids=first.outputs[0].token_ids)
            out = run(decode, "r")
        assert out.outputs[0].token_ids == want
        assert out.num_cached_tokens == 0
        s = decode.stats()["connector"]
        assert s["handoff_missed_tokens"] == 64 and s["loaded_blocks"] == 0
        assert "64 are not found here: recomputing" in caplog.text
        for e in (prefill, decode):
            assert_pool_clean(e)
    finally:
        srv.stop()
        prefill.shutdown()
        decode.shutdown()


# ---- the real topology: kvfabric up, gRPC, the proxy ---------------------------------------------------


def test_one_lmcache_config_makes_prefill_a_producer_decode_a_consumer_and_colocated_a_cache():
    from kvfabric.config import KVFabricConfig
    from kvfabric.serve_cmd import connector_spec

    lm = {"kv_connector": "lmcache", "kv_connector_extra_config": {"remote_url": "lm://127.0.0.1:65432"}}
    cfg = KVFabricConfig.from_dict({"kv_transfer_config": lm})
    assert connector_spec(cfg, "prefill") == {**lm, "kv_role": "kv_producer"}
    assert connector_spec(cfg, "decode") == {**lm, "kv_role": "kv_consumer"}
    assert connector_spec(cfg, "colocated") == {**lm, "kv_role": "kv_both"}
    cfg.tiers = {"cpu": {"capacity_bytes": "64MiB"}}
    chain = connector_spec(cfg, "colocated")["kv_connector_extra_config"]["connectors"]
    assert [c["kv_connector"] for c in chain] == ["tiered", "lmcache"]


def test_kvfabric_up_with_the_lmcache_connector_equals_colocated(tmp_path, default_model_dir):
    import openai

    from engine import LLM
    from tests.topology import Topology, running

    rng = random.Random(1)
    prompt = [rng.randrange(100, 40000) for _ in range(301)]  # 18 full blocks and 13 tokens
    with LMCacheServer.start() as srv:
        lmcache = {"remote_url": srv.url, "max_local_cpu_size": 0.1}
        topo = Topology(tmp_path, extra={"kv_transfer_config": {"kv_connector": "lmcache",
                                                                "kv_connector_extra_config": lmcache}})
        with running(topo):
            c = openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            got = c.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
            decode = topo.wait_for("decode", lambda s: s["num_running"] == 0 and s["num_waiting"] == 0)
            prefill = topo.wait_for("prefill", lambda s: s["num_running"] == 0 and s["num_waiting"] == 0)
            assert got.usage.completion_tokens == 12
            assert (prefill["connector_handoffs_sent"], prefill["connector_remote_saved_blocks"]) == (1, 18)
            assert decode["connector_handoffs_received"] == 1 and decode["connector_handoff_missed_tokens"] == 0
            assert decode["connector_remote_hit_tokens"] == 288 and decode["connector_loaded_blocks"] == 18
            for s in (prefill, decode):
                assert s["num_free_blocks"] == s["num_blocks"] - 1 and s["num_held_for_transfer"] == 0
    want = LLM(dtype="float32").generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert got.choices[0].text == want.outputs[0].text
