"""KV connectors: bytes arrive intact, held blocks are always released, failures are reported.

Every behaviour runs for each pull connector (``zmq`` over real 127.0.0.1 sockets, ``inproc``,
``ipc`` through real shared memory, and ``nixl``/``ucx`` where installed):
swapping one for the other is only a config change. A small fake scheduler loop drives both
halves the way ``engine/scheduler.py`` does; every scenario ends with nothing held or in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kv_connector import KVConnectorBase, KVTransferConfig, create_connector, known_connectors, register_connector
from kv_connector.zmq_connector import _runs

REPO = Path(__file__).resolve().parents[1]
_TRANSPORT_MODULES = {"nixl": ("nixl", "nixl_cu13", "nixl_cu12"), "ucx": ("ucxx",)}  # optional: kvfabric[transports]


def _connector_param(name: str):
    import importlib.util

    mods = _TRANSPORT_MODULES.get(name, ())
    missing = bool(mods) and not any(importlib.util.find_spec(m) for m in mods)
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{name}: pip install 'kvfabric[transports]'"))


NAMES = [_connector_param(n) for n in ("zmq", "inproc", "nixl", "ucx", "ipc")]
from tests.connector_fakes import FakeRequest  # noqa: E402

TINY = dict(block_size=4, num_layers=2, num_kv_heads=2, head_dim=8, model_id="tiny")


def make_connector(name: str, role: str, num_blocks: int = 64, dtype: torch.dtype = torch.float32,
                   layout: dict | None = None, **extra) -> KVConnectorBase:
    layout = {**TINY, **(layout or {}), "dtype": str(dtype).removeprefix("torch.")}
    conn = create_connector(KVTransferConfig(kv_connector=name, kv_role=role, kv_connector_extra_config=extra))
    shape = (num_blocks, layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
    cache = conn.allocate_kv_cache(shape, dtype, torch.device("cpu"))  # where the engine would get it
    conn.register_kv_cache(torch.randn(shape).to(dtype) if cache is None else cache.copy_(torch.randn(shape)),
                           layout)
    return conn


@pytest.fixture
def connectors():
    made: list[KVConnectorBase] = []

    def make(*args, **kwargs) -> KVConnectorBase:
        made.append(make_connector(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.shutdown()


def produce(producer, rid: str, block_ids: list[int], num_tokens: int, request_params: dict | None = None) -> dict:
    req = FakeRequest(rid, list(range(num_tokens)), num_computed_tokens=num_tokens,
                      kv_transfer_params=request_params or {"do_remote_decode": True})
    hold, params = producer.request_finished(req, block_ids)
    assert hold
    return json.loads(json.dumps(params))  # what crosses the proxy is JSON


def consume(consumer, rid: str, params: dict, local_block_ids: list[int], num_local: int = 0) -> FakeRequest:
    """Match, allocate and start one load, as the scheduler and the engine step do."""
    req = FakeRequest(rid, list(range(params["num_tokens"])), output_token_ids=[1], kv_transfer_params=params)
    n, is_async = consumer.get_num_new_matched_tokens(req, num_local)
    assert (n, is_async) == (params["num_tokens"] - num_local, True)
    consumer.update_state_after_alloc(req, local_block_ids, n)
    consumer.start_load_kv(consumer.build_connector_meta({}))
    return req


def poll(conn, until, timeout: float = 5.0) -> tuple[set, set, dict]:
    """get_finished, accumulated until ``until(sent, recved, failed)`` holds."""
    sent, recved, failed = set(), set(), {}
    deadline = time.monotonic() + timeout
    while True:
        s, r, f = conn.get_finished()
        sent |= s
        recved |= r
        failed.update(f)
        if until(sent, recved, failed) or time.monotonic() > deadline:
            return sent, recved, failed
        time.sleep(0.002)


def blocks(conn, ids: list[int]) -> torch.Tensor:
    return conn.kv_cache[ids].view(torch.uint8)


def assert_clean(*conns) -> None:
    for c in conns:
        s = c.stats()
        assert (s["held_requests"], s["held_blocks"], s["loads_in_flight"]) == (0, 0, 0), s


# ---- bytes --------------------------------------------------------------------------------------


# ucx with peer_error_handling off may move host memory through shared memory instead of TCP.
BYTES_CASES = [pytest.param(p.values[0], {}, marks=p.marks, id=p.values[0]) for p in NAMES] + [
    pytest.param("ucx", {"peer_error_handling": False}, marks=NAMES[3].marks, id="ucx-no-peer-errors"),
    # Two slots of two fp32 blocks: a load takes many fills, each slot is reused.
    pytest.param("ipc", {"ring_slots": 2, "ring_slot_bytes": 2048, "share_host_cache": False}, id="ipc-small-ring"),
    # One fp32 block a frame: every load of 6+ blocks is striped over three connections.
    pytest.param("zmq", {"max_frame_bytes": 1024, "streams": 3}, id="zmq-striped")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,extra", BYTES_CASES)
def test_bytes_equal_after_transfer(connectors, name, extra, dtype):
    producer = connectors(name, "kv_producer", dtype=dtype, **extra)
    consumer = connectors(name, "kv_consumer", dtype=dtype, **extra)
    g = torch.Generator().manual_seed(0)
    remote = (torch.randperm(63, generator=g) + 1).tolist()  # scattered, never the null block
    local = (torch.randperm(63, generator=g) + 1).tolist()
    sizes = {"a": 18, "b": 4, "c": 33}  # partial last blocks, one exact
    plan, r0 = {}, 0
    for rid, ntok in sizes.items():
        nb = -(-ntok // 4)
        plan[rid] = (remote[r0:r0 + nb], local[r0:r0 + nb], produce(producer, rid, remote[r0:r0 + nb], ntok))
        r0 += nb
    for rid, (_, loc, params) in plan.items():
        consume(consumer, "d-" + rid, params, loc)

    _, recved, failed = poll(consumer, lambda s, r, f: len(r) + len(f) == 3)
    assert failed == {} and recved == {"d-a", "d-b", "d-c"}
    for rid, (rem, loc, _) in plan.items():
        assert torch.equal(blocks(consumer, loc), blocks(producer, rem)), rid
    sent, _, _ = poll(producer, lambda s, r, f: len(s) == 3)
    assert sent == {"a", "b", "c"}
    nbytes = sum(len(rem) for rem, _, _ in plan.values()) * producer.wire_layout["block_bytes"]
    assert consumer.stats()["bytes_received"] == nbytes and consumer.stats()["transfers"] == 3
    assert producer.stats()["bytes_sent"] == nbytes
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_local_prefix_hits_are_not_pulled(connectors, name):
    producer = connectors(name, "kv_producer")
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [10, 11, 12, 13, 14], num_tokens=18)
    before = blocks(consumer, [40, 41]).clone()
    consume(consumer, "d", params, [40, 41, 42, 43, 44], num_local=8)  # two blocks hit locally

    _, recved, _ = poll(consumer, lambda s, r, f: r or f)
    assert recved == {"d"}
    assert torch.equal(blocks(consumer, [40, 41]), before)
    assert torch.equal(blocks(consumer, [42, 43, 44]), blocks(producer, [12, 13, 14]))
    assert consumer.stats()["bytes_received"] == 3 * consumer.wire_layout["block_bytes"]
    poll(producer, lambda s, r, f: s)
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_nothing_to_pull_when_local_prefix_covers_all(connectors, name):
    producer = connectors(name, "kv_producer")
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [3, 4], num_tokens=8)
    req = FakeRequest("d", list(range(8)), output_token_ids=[1], kv_transfer_params=params)
    assert consumer.get_num_new_matched_tokens(req, 8) == (0, False)
    sent, _, _ = poll(producer, lambda s, r, f: s, timeout=2)
    assert sent == {"p"}
    assert_clean(producer, consumer)


def test_one_token_is_always_left_to_compute(connectors):
    consumer = connectors("inproc", "kv_consumer")
    params = {"kv_connector": "inproc", "remote_block_ids": [1, 2], "num_tokens": 8, "remote_engine_id": "x",
              "remote_host": "inproc", "remote_port": 0, "remote_request_id": "p"}
    req = FakeRequest("d", list(range(8)), kv_transfer_params=params)  # prompt only, no first token yet
    assert consumer.get_num_new_matched_tokens(req, 0) == (7, True)
    consumer.abort("d")


# ---- holding and releasing ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_blocks_held_until_consumer_says_done(connectors, name):
    producer = connectors(name, "kv_producer")
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [5, 6, 7], num_tokens=10)
    assert producer.get_finished()[0] == set()
    assert producer.stats()["held_blocks"] == 3
    consume(consumer, "d", params, [20, 21, 22])
    poll(consumer, lambda s, r, f: r)
    sent, _, _ = poll(producer, lambda s, r, f: s)
    assert sent == {"p"}
    assert producer.get_finished()[0] == set()  # reported once
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_expiry_releases_when_the_consumer_never_comes(connectors, name):
    producer = connectors(name, "kv_producer", lease_s=0.2)
    consumer = connectors(name, "kv_consumer", recv_timeout_s=2.0)
    params = produce(producer, "p", [5, 6], num_tokens=8)
    assert params["lease_s"] == 0.2
    t0 = time.monotonic()
    sent, _, _ = poll(producer, lambda s, r, f: s, timeout=3)
    assert sent == {"p"} and 0.2 <= time.monotonic() - t0 < 2
    assert producer.stats()["expired"] == 1

    consume(consumer, "d", params, [20, 21])  # too late: refused
    _, _, failed = poll(consumer, lambda s, r, f: f)
    assert "not held here" in failed["d"]
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_a_queued_request_renews_its_lease_until_it_loads(connectors, name):
    """Queued on the consumer (not yet matched) for 3 leases: renewals keep the blocks; the load works."""
    producer = connectors(name, "kv_producer", lease_s=1.5)  # generous: a cold UCX endpoint, a busy CPU
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [5, 6, 7], num_tokens=12)
    queued = FakeRequest("d", list(range(12)), output_token_ids=[1], kv_transfer_params=params)
    consumer.request_added(queued)
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:  # both engines keep stepping; the consumer's queue does not move
        assert producer.get_finished()[0] == set()
        consumer.get_finished()
        time.sleep(0.01)
    s = producer.stats()
    assert s["expired"] == 0 and s["held_blocks"] == 3 and s["leases_renewed"] >= 4, s
    assert consumer.stats()["renewals_sent"] >= 4
    consume(consumer, "d", params, [20, 21, 22])
    _, recved, failed = poll(consumer, lambda s, r, f: r or f)
    assert recved == {"d"} and not failed
    poll(producer, lambda s, r, f: s)
    assert consumer.stats()["leases_watched"] == 0
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_renewals_stop_when_the_consumer_drops_the_request(connectors, name):
    producer = connectors(name, "kv_producer", lease_s=0.3)
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [5, 6], num_tokens=8)
    queued = FakeRequest("d", list(range(8)), output_token_ids=[1], kv_transfer_params=params)
    consumer.request_added(queued)
    consumer.get_finished()
    consumer.request_finished(queued, [])  # finished (aborted) before it was matched: released at once
    sent, _, _ = poll(producer, lambda s, r, f: s, timeout=3)
    assert sent == {"p"} and producer.stats()["expired"] == 0
    assert_clean(producer, consumer)


def test_a_striped_load_that_fails_is_reported_once_and_leaks_nothing(connectors):
    striped = {"max_frame_bytes": 1024, "streams": 3}
    producer = connectors("zmq", "kv_producer", lease_s=0.2, **striped)
    consumer = connectors("zmq", "kv_consumer", **striped)
    params = produce(producer, "p", list(range(1, 17)), num_tokens=64)
    poll(producer, lambda s, r, f: s, timeout=3)  # expired: every stripe's read is refused
    consume(consumer, "d", params, list(range(20, 36)))
    failures = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        failures += list(consumer.get_finished()[2].items())
        time.sleep(0.01)
    assert len(failures) == 1 and "not held here" in failures[0][1]
    assert consumer.stats()["failures"] == 1
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_consumer_abort_releases_producer_blocks_at_once(connectors, name):
    producer = connectors(name, "kv_producer", lease_s=60)
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [5, 6, 7], num_tokens=12)
    req = FakeRequest("d", list(range(12)), output_token_ids=[1], kv_transfer_params=params)
    n, _ = consumer.get_num_new_matched_tokens(req, 0)
    consumer.update_state_after_alloc(req, [20, 21, 22], n)
    meta = consumer.build_connector_meta({})
    before = blocks(consumer, [20, 21, 22]).clone()

    consumer.abort("d")
    consumer.start_load_kv(meta)  # a stale meta must not resurrect the load
    t0 = time.monotonic()
    sent, _, _ = poll(producer, lambda s, r, f: s, timeout=2)
    assert sent == {"p"} and time.monotonic() - t0 < 1
    assert consumer.get_finished() == (set(), set(), {})
    assert torch.equal(blocks(consumer, [20, 21, 22]), before)
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_consumer_request_finished_before_load_releases(connectors, name):
    producer = connectors(name, "kv_producer", lease_s=60)
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [5, 6], num_tokens=8)
    req = FakeRequest("d", list(range(8)), output_token_ids=[1], kv_transfer_params=params)
    consumer.get_num_new_matched_tokens(req, 0)  # matched, then aborted while still waiting
    assert consumer.request_finished(req, []) == (False, None)
    sent, _, _ = poll(producer, lambda s, r, f: s, timeout=2)
    assert sent == {"p"}
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_producer_does_not_hold_aborted_or_empty_requests(connectors, name):
    producer = connectors(name, "kv_producer")

    class Aborted:
        finish_reason = "abort"

    req = FakeRequest("p", list(range(8)), num_computed_tokens=8)
    req.status = Aborted()
    assert producer.request_finished(req, [3, 4]) == (False, None)
    assert producer.request_finished(FakeRequest("q", [1, 2]), []) == (False, None)
    assert_clean(producer)


# ---- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_unknown_request_on_producer_fails_clearly(connectors, name):
    producer = connectors(name, "kv_producer")
    consumer = connectors(name, "kv_consumer")
    params = produce(producer, "p", [5, 6], num_tokens=8)
    params["remote_request_id"] = "nope"
    consume(consumer, "d", params, [20, 21])
    _, recved, failed = poll(consumer, lambda s, r, f: f)
    assert recved == set() and "'nope' is not held here" in failed["d"]
    assert producer.stats()["held_requests"] == 1
    assert_clean(consumer)


@pytest.mark.parametrize("name", NAMES)
def test_layout_mismatch_is_a_clear_error(connectors, name):
    producer = connectors(name, "kv_producer", lease_s=60)
    consumer = connectors(name, "kv_consumer", layout={"head_dim": 16})
    params = produce(producer, "p", [5, 6], num_tokens=8)
    before = blocks(consumer, [20, 21]).clone()
    consume(consumer, "d", params, [20, 21])
    _, recved, failed = poll(consumer, lambda s, r, f: f)
    assert recved == set()
    assert "KV layout mismatch" in failed["d"] and "head_dim 16 here != 8" in failed["d"]
    assert torch.equal(blocks(consumer, [20, 21]), before)
    poll(producer, lambda s, r, f: s, timeout=2)  # the consumer gave the blocks back
    assert_clean(producer, consumer)


@pytest.mark.parametrize("name", NAMES)
def test_producer_gone_before_load_fails(connectors, name):
    producer = connectors(name, "kv_producer")
    consumer = connectors(name, "kv_consumer", recv_timeout_s=0.3)
    params = produce(producer, "p", [5, 6], num_tokens=8)
    producer.shutdown()
    consume(consumer, "d", params, [20, 21])
    _, recved, failed = poll(consumer, lambda s, r, f: f, timeout=3)
    assert recved == set()
    assert ("no in-process producer" in failed["d"]) if name == "inproc" else (
        "sent nothing for" in failed["d"] or "closed the connection" in failed["d"])  # ucx notices at once
    assert_clean(consumer)
    if name != "inproc":
        assert consumer.stats()["open_peer_sockets"] == 0


def test_connector_mismatch_in_params_fails_clearly(connectors):
    consumer = connectors("zmq", "kv_consumer")
    params = {"kv_connector": "inproc", "remote_block_ids": [1, 2], "num_tokens": 8, "remote_engine_id": "x",
              "remote_host": "inproc", "remote_port": 0, "remote_request_id": "p"}
    consume(consumer, "d", params, [3, 4])
    _, _, failed = poll(consumer, lambda s, r, f: f)
    assert "'inproc' producer" in failed["d"]


_PRODUCER_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from kv_connector import KVTransferConfig, create_connector
    from kv_connector import zmq_connector

    send_run = zmq_connector._Server._send_run
    def slow_send_run(self, *args):  # a producer that stalls mid-transfer, to be killed there
        time.sleep(0.02)
        return send_run(self, *args)
    zmq_connector._Server._send_run = slow_send_run

    layout = dict(block_size=16, num_layers=4, num_kv_heads=4, head_dim=64, dtype="float32", model_id="big")
    conn = create_connector(KVTransferConfig(kv_connector="zmq", kv_role="kv_producer",
                                             kv_connector_extra_config={"max_frame_bytes": 1}))
    conn.register_kv_cache(torch.randn(520, 4, 2, 16, 4, 64), layout)

    class Req:
        request_id, num_computed_tokens, status = "big", 512 * 16, None
        kv_transfer_params = {"do_remote_decode": True}
    print(json.dumps(conn.request_finished(Req(), list(range(1, 513)))[1]), flush=True)
    time.sleep(60)
""")


def test_producer_killed_mid_transfer_fails_the_load(connectors, tmp_path):
    script = tmp_path / "producer.py"
    script.write_text(_PRODUCER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        params = json.loads(proc.stdout.readline())
        consumer = connectors("zmq", "kv_consumer", num_blocks=520, layout=dict(
            block_size=16, num_layers=4, num_kv_heads=4, head_dim=64, model_id="big"), recv_timeout_s=0.5)
        consume(consumer, "d", params, list(range(1, 513)))
        deadline = time.monotonic() + 10
        while consumer.stats()["bytes_received"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert 0 < consumer.stats()["bytes_received"] < 512 * 128 * 1024  # mid-transfer
        proc.send_signal(signal.SIGKILL)
        _, recved, failed = poll(consumer, lambda s, r, f: f, timeout=5)
    finally:
        proc.kill()
        proc.wait()
    assert recved == set()
    assert "sent nothing for" in failed["d"] and "of 512 blocks" in failed["d"]
    assert_clean(consumer)
    assert consumer.stats()["open_peer_sockets"] == 0
    assert consumer.stats()["failures"] == 1


# ---- lifecycle and config ------------------------------------------------------------------------


def test_shutdown_closes_every_thread_and_socket():
    producer = make_connector("zmq", "kv_both")
    consumer = make_connector("zmq", "kv_both")
    try:
        assert producer.request_finished(FakeRequest("x", [1, 2], num_computed_tokens=2), [1]) == (False, None)
        params = produce(producer, "p", [1, 2], num_tokens=8, request_params={"do_remote_decode": True})
        consume(consumer, "d", params, [3, 4])
        poll(consumer, lambda s, r, f: r)
        names = {t.name for t in threading.enumerate()}
        assert any(n.startswith("kv-zmq-server") for n in names) and any(n.startswith("kv-zmq-client") for n in names)
    finally:
        for c in (producer, consumer):
            c.shutdown()  # context.term() returns only once every socket is closed
            c.shutdown()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("kv-zmq")]


def test_producer_reports_its_ephemeral_port(connectors):
    producer = connectors("zmq", "kv_producer")
    params = produce(producer, "p", [1], num_tokens=2)
    assert params["remote_host"] == "127.0.0.1" and params["remote_port"] > 0
    assert params["remote_block_ids"] == [1] and params["remote_engine_id"] == producer.engine_id
    assert params["lease_s"] == 30.0  # vLLM's default lease


def test_runs_group_consecutive_block_ids():
    assert _runs([4, 5, 6, 9, 10, 2], max_blocks=2) == [(0, 4, 2), (2, 6, 1), (3, 9, 2), (5, 2, 1)]


def test_unknown_connector_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown kv_connector 'nope'; known: .*inproc.*zmq"):
        create_connector(KVTransferConfig(kv_connector="nope"))


def test_register_connector():
    made = []
    register_connector("test-fake", lambda cfg: made.append(cfg) or "fake")
    assert "test-fake" in known_connectors()
    assert create_connector(KVTransferConfig(kv_connector="test-fake")) == "fake" and len(made) == 1
    with pytest.raises(ValueError, match="already registered"):
        register_connector("zmq", lambda cfg: None)


def test_config_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"\['kv_buffer_size', 'kv_rank'\]"):
        KVTransferConfig.from_dict({"kv_connector": "zmq", "kv_rank": 0, "kv_buffer_size": 1})


def test_config_parses_json_and_yaml():
    a = KVTransferConfig.from_json('{"kv_connector": "zmq", "kv_role": "kv_producer", "kv_port": 5555}')
    b = KVTransferConfig.from_json("kv_connector: zmq\nkv_role: kv_producer\nkv_port: 5555\n")
    assert (a.kv_connector, a.role.value, a.kv_port) == (b.kv_connector, b.role.value, b.kv_port) == (
        "zmq", "kv_producer", 5555)
    assert a.engine_id != b.engine_id  # a fresh engine id unless one is given
    with pytest.raises(ValueError, match="kv_role 'boss'"):
        KVTransferConfig(kv_connector="zmq", kv_role="boss")
    with pytest.raises(ValueError, match="needs 'kv_connector'"):
        KVTransferConfig.from_dict({})


_PLACEMENTS = [("cuda:0", "cuda:0"), ("pinned", "cuda:0"),  # "pinned": host memory the GPU reads directly
               pytest.param("cuda:0", "cuda:1", marks=pytest.mark.skipif(
                   torch.cuda.device_count() < 2, reason="needs two GPUs"))]


def _cache(where: str, shape: tuple, fill) -> torch.Tensor:
    if where == "pinned":
        return fill(shape).bfloat16().pin_memory()
    return fill(shape, device=where).bfloat16()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("producer_at,consumer_at", _PLACEMENTS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("block_tokens,heads,head_dim", [(4, 2, 8), (16, 8, 64)], ids=["512B", "64KiB"])
def test_device_caches_round_trip(name, producer_at, consumer_at, block_tokens, heads, head_dim):
    """GPU caches (and a producer in pinned host memory, and two GPUs): scattered runs arrive intact,
    whichever path the transport takes (CUDA IPC, cuda_copy, or staging through host memory).
    64 KiB blocks make every run a UCX rendezvous (>= 8 KiB), the path that hung by default."""
    shape = (64, 2, 2, block_tokens, heads, head_dim)
    layout = {**TINY, "dtype": "bfloat16", "block_size": block_tokens, "num_kv_heads": heads, "head_dim": head_dim}
    producer = create_connector(KVTransferConfig(kv_connector=name, kv_role="kv_producer"))
    consumer = create_connector(KVTransferConfig(kv_connector=name, kv_role="kv_consumer"))
    try:
        producer.register_kv_cache(_cache(producer_at, shape, torch.randn), layout)
        consumer.register_kv_cache(_cache(consumer_at, shape, torch.zeros), layout)
        remote, local = [9, 3, 4, 5, 30, 31], [40, 41, 42, 7, 8, 1]
        consume(consumer, "d", produce(producer, "p", remote, num_tokens=len(remote) * block_tokens - 2), local)
        _, recved, failed = poll(consumer, lambda s, r, f: r or f)
        assert recved == {"d"}, failed
        assert torch.equal(blocks(consumer, local).cpu(), blocks(producer, remote).cpu())
        poll(producer, lambda s, r, f: s)
        assert_clean(producer, consumer)
    finally:
        producer.shutdown()
        consumer.shutdown()


@pytest.mark.parametrize("name", [_connector_param("nixl")])
def test_nixl_backend_params_merge_over_the_cuda_ipc_default(name):
    conn = create_connector(KVTransferConfig(kv_connector=name, kv_connector_extra_config={
        "backend_params": {"UCX": {"num_workers": 2}}}))
    try:  # without the default, a READ between two processes on one PCIe GPU goes over TCP
        assert conn.backend_params == {"UCX": {"engine_config": "CUDA_IPC_ENABLE_GET_ZCOPY=y", "num_workers": "2"}}
    finally:
        conn.shutdown()


def test_ucx_context_config_defaults_to_put_rendezvous_and_the_environment_wins(monkeypatch):
    from kv_connector.ucx_connector import ucx_context_config

    monkeypatch.delenv("UCX_RNDV_SCHEME", raising=False)
    monkeypatch.delenv("UCX_TLS", raising=False)
    assert ucx_context_config({}) == {"RNDV_SCHEME": "put_zcopy"}
    assert ucx_context_config({"tls": "tcp", "rndv_scheme": "auto"}) == {"RNDV_SCHEME": "auto", "TLS": "tcp"}
    monkeypatch.setenv("UCX_RNDV_SCHEME", "get_zcopy")
    assert ucx_context_config({"tls": "tcp"}) == {"TLS": "tcp"}
