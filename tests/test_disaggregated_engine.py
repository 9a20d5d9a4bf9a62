"""Two engines in one process joined by a real connector: prefill → KV transfer → decode equals
one colocated engine, token for token, and aborts free both sides at once."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from kv_connector import KVTransferConfig, create_connector
from tests.test_kv_connector import NAMES
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("tiny-qwen3", tmp_path_factory.mktemp("m") / "tiny-qwen3", seed=1)


def make_engine(model_dir, connector_name=None, role=None, **kw):
    conn = None
    if connector_name:
        conn = create_connector(KVTransferConfig(kv_connector=connector_name, kv_role=role,
                                                 kv_connector_extra_config={"lease_s": 60}))
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", **kw), kv_connector=conn)


def run(engine, until=None, limit=10_000):
    finished = {}
    for _ in range(limit):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if until is not None and until(finished):
            return finished
        if until is None and not engine.has_work():
            return finished
        if engine.last_step_num_tokens == 0:
            time.sleep(0.001)
    raise AssertionError("engine did not finish")


def disaggregated(prefill, decode, rid, prompt, params):
    first = dataclasses.replace(params, max_tokens=1)
    prefill.add_request(rid, prompt, first, kv_transfer_params={"do_remote_decode": True})
    p_out = run(prefill, until=lambda f: rid in f)[rid]
    assert p_out.kv_transfer_params is not None
    decode.add_request(rid, prompt, params, kv_transfer_params=p_out.kv_transfer_params,
                       output_token_ids=p_out.outputs[0].token_ids)
    return run(decode, until=lambda f: rid in f)[rid]


@pytest.mark.parametrize("connector", NAMES)  # swapping transports is a config change only
def test_disaggregated_equals_colocated_greedy_and_seeded(model_dir, connector):
    colocated = make_engine(model_dir)
    prefill = make_engine(model_dir, connector, "kv_producer", max_num_batched_tokens=32)
    decode = make_engine(model_dir, connector, "kv_consumer")
    rng = random.Random(0)
    try:
        for i, (length, params) in enumerate([
            (37, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
            (64, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
            (23, SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=20, ignore_eos=True)),
        ]):
            prompt = [rng.randrange(3, 500) for _ in range(length)]
            colocated.add_request(f"c{i}", prompt, params)
            expected = run(colocated)[f"c{i}"].outputs[0].token_ids
            got = disaggregated(prefill, decode, f"r{i}", prompt, params)
            assert got.outputs[0].token_ids == expected
            assert got.num_cached_tokens == length  # the whole prompt came over the connector
        run(prefill, until=lambda f: not prefill.scheduler.held)
        for e in (prefill, decode):
            s = e.stats()
            assert s["num_free_blocks"] == s["num_blocks"] - 1 and s["num_held_for_transfer"] == 0
    finally:
        for e in (colocated, prefill, decode):
            e.shutdown()


def test_abort_while_waiting_for_remote_kv_frees_both_sides_at_once(model_dir):
    prefill = make_engine(model_dir, "zmq", "kv_producer")
    decode = make_engine(model_dir, "zmq", "kv_consumer")
    try:
        prompt = list(range(10, 90))
        prefill.add_request("r", prompt, SamplingParams(max_tokens=1), kv_transfer_params={"do_remote_decode": True})
        p_out = run(prefill, until=lambda f: "r" in f)["r"]
        assert prefill.scheduler.held  # blocks held for the decode side
        decode.add_request("r", prompt, SamplingParams(max_tokens=5), kv_transfer_params=p_out.kv_transfer_params,
                           output_token_ids=p_out.outputs[0].token_ids)
        decode.abort_request("r")  # before the load could even start
        out = run(decode, until=lambda f: "r" in f)["r"]
        assert out.outputs[0].finish_reason == "abort"
        s = decode.stats()
        assert s["num_free_blocks"] == s["num_blocks"] - 1
        t0 = time.monotonic()
        run(prefill, until=lambda f: not prefill.scheduler.held)
        assert time.monotonic() - t0 < 5  # released at once, not at the 60 s expiry
        s = prefill.stats()
        assert s["num_free_blocks"] == s["num_blocks"] - 1
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_prefill_that_stops_at_eos_holds_nothing(model_dir):
    prefill = make_engine(model_dir, "zmq", "kv_producer")
    try:
        prompt = list(range(10, 40))
        probe = make_engine(model_dir)
        probe.add_request("p", prompt, SamplingParams(temperature=0.0, max_tokens=1))
        first = run(probe)["p"].outputs[0].token_ids[0]
        prefill.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=1, stop_token_ids=[first]),
                            kv_transfer_params={"do_remote_decode": True})
        out = run(prefill, until=lambda f: "r" in f)["r"]
        assert out.outputs[0].finish_reason == "stop" and out.kv_transfer_params is None
        assert not prefill.scheduler.held
    finally:
        prefill.shutdown()
