"""Leases and failed loads on the real topology: `kvfabric up` processes, gRPC, real connectors.

Decode runs one sequence at a time (``max_num_seqs: 1``), so a long request keeps every later
one queued on decode, its prefill's blocks held, for longer than the lease:

- under that backlog the queued request's lease is renewed: nothing expires, nothing fails;
- a decode that dies stops renewing: prefill frees the blocks within one lease;
- a producer that dies makes the load fail: decode recomputes (policy ``recompute``), the client
  gets HTTP 200 and the tokens an offline engine gives, and the metric counts it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import httpx
import pytest

from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc
from tests.topology import Topology, running

MODEL = "SmolLM2-135M-Instruct"
LEASE_S = 1.0
LONG = {"prompt": "Tell me a long story about a lighthouse keeper.", "max_tokens": 160}
QUEUED = ["The capital of France is", "def fibonacci(n):"]
SHORT_TOKENS = 8
ENGINE = {"max_num_seqs": 1}


HELD_FRACTION = 0.01  # zmq's prefill: ~3 of its ~360 blocks may wait for decode (backpressure)


def _topology(workdir, connector: str) -> Topology:
    extra = {"kv_transfer_config": {"kv_connector": connector, "kv_connector_extra_config": {
        "lease_s": LEASE_S, "recv_timeout_s": 3, **({"max_held_fraction": HELD_FRACTION} if connector == "zmq" else {})}}}
    return Topology(workdir / connector, kv_connector=connector, engine=ENGINE, extra=extra)


@pytest.fixture(scope="module")
def topologies(tmp_path_factory, default_model_dir):
    workdir = tmp_path_factory.mktemp("leases")
    (workdir / "auto").mkdir()
    (workdir / "zmq").mkdir()
    with running(_topology(workdir, "auto"), _topology(workdir, "zmq")) as topos:
        yield topos


@pytest.fixture(scope="module")
def reference(default_model_dir) -> dict[str, str]:
    """What a colocated engine answers (the offline LLM: the same engine, one process)."""
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=SHORT_TOKENS, ignore_eos=True)
    return {p: o.outputs[0].text for p, o in zip(QUEUED, LLM(dtype="float32").generate(QUEUED, params))}


def _complete(topo: Topology, prompt: str, max_tokens: int, results: dict) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(topo.url + "/v1/completions", json=body, timeout=300)
    results[prompt] = r


def _in_background(topo: Topology, prompt: str, max_tokens: int, results: dict) -> threading.Thread:
    t = threading.Thread(target=_complete, args=(topo, prompt, max_tokens, results), daemon=True)
    t.start()
    return t


def _backlog(topo: Topology, results: dict) -> list[threading.Thread]:
    """A long request running on decode and the QUEUED ones prefilled and waiting behind it."""
    threads = [_in_background(topo, LONG["prompt"], LONG["max_tokens"], results)]
    topo.wait_for("decode", lambda s: s["num_running"] == 1, timeout=120)
    threads += [_in_background(topo, p, SHORT_TOKENS, results) for p in QUEUED]
    topo.wait_for("prefill", lambda s: s["connector_held_requests"] == len(QUEUED), timeout=120)
    return threads


def test_leases_are_renewed_under_a_decode_backlog_longer_than_the_lease(topologies, reference):
    topo = topologies[0]
    before = topo.stats("decode")
    results: dict = {}
    threads = _backlog(topo, results)
    held_since = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    waited = time.monotonic() - held_since
    assert waited > 2 * LEASE_S, f"the backlog lasted {waited:.1f}s: too short to prove anything"
    for prompt in QUEUED:
        r = results[prompt]
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == SHORT_TOKENS
    prefill, decode = topo.stats("prefill"), topo.stats("decode")
    assert prefill["connector_expired"] == 0
    assert prefill["connector_leases_renewed"] > 0 and decode["connector_renewals_sent"] > 0
    assert decode["kv_load_failures_recomputed"] == before["kv_load_failures_recomputed"]
    # Every one pulled (the long one too), none recomputed.
    assert decode["connector_transfers"] - before["connector_transfers"] == len(QUEUED) + 1
    texts = {p: results[p].json()["choices"][0]["text"] for p in QUEUED}
    assert texts == reference
    topo.wait_for("prefill", lambda s: s["connector_held_requests"] == 0 and s["num_held_for_transfer"] == 0)


def _turn(prefill, decode, rid: str, ids: list[int], max_tokens: int) -> list[int]:
    """One request straight through the engines, as the proxy sequences it; its output tokens."""
    params = pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    first = prefill.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=ids, params=params), timeout=120)
    out = [first.first_token_id]
    for chunk in decode.Generate(pb.GenerateRequest(
            request_id=rid, prompt_token_ids=ids, params=params, output_token_ids=out,
            kv_transfer_params_json=first.kv_transfer_params_json), timeout=120):
        out += list(chunk.token_ids)
    return out


def test_a_second_turn_pulls_only_the_blocks_decode_does_not_have(topologies):
    topo = topologies[1]
    bs = 16  # the engine's default block_size
    with grpc.insecure_channel(f"127.0.0.1:{topo.decode_port}") as dch, \
            grpc.insecure_channel(f"127.0.0.1:{topo.prefill_port}") as pch:
        decode, prefill = pb_grpc.DecodeServiceStub(dch), pb_grpc.PrefillServiceStub(pch)
        turn1 = [300 + i for i in range(4 * bs)]  # 4 full blocks
        s0 = topo.stats("decode")
        out1 = _turn(prefill, decode, "turn1", turn1, max_tokens=8)
        s1 = topo.stats("decode")
        pulled1 = s1["connector_bytes_received"] - s0["connector_bytes_received"]
        block_bytes = pulled1 // 4
        assert pulled1 == 4 * block_bytes > 0
        # The next turn: the conversation so far plus a new message, 112 tokens (7 blocks). Decode
        # cached turn 1's 4 prompt blocks (its 8 generated tokens fill no block): 3 come over.
        turn2 = turn1 + out1 + [900 + i for i in range(40)]
        _turn(prefill, decode, "turn2", turn2, max_tokens=4)
        s2 = topo.stats("decode")
    assert s2["connector_bytes_received"] - s1["connector_bytes_received"] == 3 * block_bytes
    assert s2["kv_load_failures_recomputed"] == s0["kv_load_failures_recomputed"]
    assert s2["prefix_cache_hits"] - s1["prefix_cache_hits"] >= 4 * bs  # decode counted its own hits


def test_backpressure_holds_prompts_at_prefill_and_fails_none(topologies):
    topo = topologies[1]
    before = topo.stats("prefill")
    budget = int(HELD_FRACTION * before["num_blocks"])
    results: dict = {}
    threads = [_in_background(topo, LONG["prompt"], LONG["max_tokens"], results)]
    topo.wait_for("decode", lambda s: s["num_running"] == 1, timeout=120)
    prompts = [f"Question {i}: what is the tallest mountain on each continent, and how tall is it?" * 2
               for i in range(4)]  # ~40 tokens: 3 blocks each, the budget's worth
    threads += [_in_background(topo, p, SHORT_TOKENS, results) for p in prompts]
    # Decode is busy: one prompt's blocks wait for it, the others wait at prefill, not computed.
    s = topo.wait_for("prefill", lambda s: s["connector_held_requests"] >= 1 and s["num_waiting"] >= 2,
                      timeout=120)
    assert s["connector_held_blocks"] >= budget
    for t in threads:
        t.join(timeout=300)
    for p in prompts:
        assert results[p].status_code == 200, results[p].text
        assert results[p].json()["usage"]["completion_tokens"] == SHORT_TOKENS
    after = topo.stats("prefill")
    assert after["num_backpressure_steps"] > before["num_backpressure_steps"]
    # (Leases are test_leases_are_renewed_...'s business: here a 1 s lease on a saturated CPU may
    # run out between two decode steps, and the load is then recomputed, which is fine.)
    topo.wait_for("prefill", lambda s: s["connector_held_requests"] == 0)


def test_a_failed_load_is_recomputed_and_the_client_never_sees_it(topologies, reference):
    topo = topologies[1]  # zmq: a killed producer's blocks are unreachable
    before = topo.stats("decode")
    results: dict = {}
    threads = _backlog(topo, results)
    os.kill(topo.pid_of("prefill"), signal.SIGKILL)  # its held blocks die with it
    for t in threads:
        t.join(timeout=300)
    for prompt in QUEUED:
        r = results[prompt]
        assert r.status_code == 200, r.text
    texts = {p: results[p].json()["choices"][0]["text"] for p in QUEUED}
    assert texts == reference
    after = topo.stats("decode")
    assert after["kv_load_failures_recomputed"] - before["kv_load_failures_recomputed"] == len(QUEUED)
    # The proxy exports it as a gauge per instance.
    metrics = httpx.get(topo.url + "/metrics", timeout=30).text
    assert "kvfabric_kv_load_failures_recomputed" in metrics


def test_a_killed_decode_stops_renewing_and_prefill_frees_within_a_lease(topologies):
    topo = topologies[0]
    # Straight to the engines (no proxy, which would release the hold itself when decode fails).
    with grpc.insecure_channel(f"127.0.0.1:{topo.decode_port}") as dch, \
            grpc.insecure_channel(f"127.0.0.1:{topo.prefill_port}") as pch:
        decode, prefill = pb_grpc.DecodeServiceStub(dch), pb_grpc.PrefillServiceStub(pch)
        params = pb.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        long_ids = list(range(100, 140))
        busy = decode.Generate(pb.GenerateRequest(request_id="long", prompt_token_ids=long_ids, params=params))
        next(busy)  # running on decode now
        ids = list(range(200, 264))
        short = pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        first = prefill.Prefill(pb.PrefillRequest(request_id="q", prompt_token_ids=ids, params=short), timeout=120)
        assert first.kv_transfer_params_json
        assert json.loads(first.kv_transfer_params_json)["lease_s"] == LEASE_S
        queued = decode.Generate(pb.GenerateRequest(
            request_id="q", prompt_token_ids=ids, params=short, output_token_ids=[first.first_token_id],
            kv_transfer_params_json=first.kv_transfer_params_json))
        time.sleep(3 * LEASE_S)  # queued behind "long" for three leases: renewed, still held
        held = topo.stats("prefill")
        assert held["connector_held_requests"] == 1 and held["connector_expired"] == 0, held
        os.kill(topo.pid_of("decode"), signal.SIGKILL)
        killed = time.monotonic()
        topo.wait_for("prefill", lambda s: s["connector_held_requests"] == 0, timeout=LEASE_S + 10)
        freed_after = time.monotonic() - killed
        for call in (busy, queued):
            call.cancel()
    s = topo.stats("prefill")
    assert s["connector_expired"] == 1 and s["num_held_for_transfer"] == 0
    # Within one lease, plus the poll of the wait above and a renewal that was already in flight.
    assert freed_after < LEASE_S + 1.5, freed_after
