"""What only the ``ipc`` connector has: its shared ring leaves nothing in /dev/shm, it refuses peers it
cannot share memory with, and a real ``kvfabric up`` topology serves through it.

Its common behaviours (bytes, holds, expiry, aborts, layout errors, a producer that vanishes) run
in tests/test_kv_connector.py with every other connector; a producer killed mid-transfer in
tests/test_transport_failures.py; GPU round trips under the ``gpu`` marker there too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kv_connector import shm_segment
from tests.test_kv_connector import assert_clean, blocks, consume, make_connector, poll, produce


@pytest.fixture
def connectors():
    made = []

    def make(*args, **kwargs):
        made.append(make_connector(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.shutdown()


def _ours() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"kvfabric-{os.getpid()}-")]


RING = {"share_host_cache": False}  # CPU caches: through the ring, not the producer's shared cache
BLOCK_BYTES = 2 * 2 * 4 * 2 * 8 * 4  # make_connector's default layout (TINY), float32


def test_ring_name_is_gone_once_the_producer_maps_it(connectors):
    producer = connectors("ipc", "kv_producer", **RING)
    consumer = connectors("ipc", "kv_consumer")
    consume(consumer, "d", produce(producer, "p", [5, 6, 7], num_tokens=10), [20, 21, 22])
    _, recved, failed = poll(consumer, lambda s, r, f: r or f)
    assert recved == {"d"}, failed
    assert torch.equal(blocks(consumer, [20, 21, 22]), blocks(producer, [5, 6, 7]))
    assert consumer.stats()["rings"] == 1 and producer.stats()["rings"] == 1  # mapped on both sides...
    assert _ours() == []  # ...and unlinked: a crash of either side now leaves nothing behind
    poll(producer, lambda s, r, f: s)
    assert_clean(producer, consumer)
    consumer.shutdown()
    producer.shutdown()
    assert consumer.stats()["rings"] == 0 and producer.stats()["rings"] == 0


@pytest.mark.parametrize("direct", [True, False], ids=["one-sided", "asked"])
def test_a_host_cache_is_shared_and_read_in_place(connectors, direct):
    """A producer's host cache lives in shared memory (allocate_kv_cache): the consumer maps it and
    copies the blocks out, no ring — straight from the params (one-sided: the cache and the hold
    board mapped), or after asking (the cache mapped); the names go at shutdown."""
    producer = connectors("ipc", "kv_producer", direct_read=direct)
    consumer = connectors("ipc", "kv_consumer", direct_read=direct)
    seg = producer._cache_seg
    assert seg is not None and producer.kv_cache.data_ptr() == seg.buf.data_ptr() and os.path.exists(seg.path)
    params = produce(producer, "p", [9, 3, 4, 5], num_tokens=14)
    assert ("ipc" in params) == direct
    consume(consumer, "d", params, [40, 41, 7, 8])
    _, recved, failed = poll(consumer, lambda s, r, f: r or f)
    assert recved == {"d"}, failed
    assert torch.equal(blocks(consumer, [40, 41, 7, 8]), blocks(producer, [9, 3, 4, 5]))
    s = consumer.stats()
    assert (s["rings"], s["ipc_mappings"], s["bytes_received"]) == (0, 2 if direct else 1, 4 * BLOCK_BYTES), s
    poll(producer, lambda s, r, f: s)  # the done ends the hold: the blocks are freed at once
    assert_clean(producer, consumer)
    assert producer.stats()["bytes_sent"] == 4 * BLOCK_BYTES
    names = [seg.path] + ([producer._board.seg.path] if direct else [])
    producer.shutdown()
    assert not any(os.path.exists(n) for n in names)


def test_a_hold_that_ends_during_a_one_sided_read_fails_it(connectors, monkeypatch):
    """The producer ends the hold (here: aborts the request, and its scheduler takes the blocks back)
    while the consumer copies: the hold word says so after the copy, and the load fails rather than
    keep bytes that may have been overwritten."""
    from kv_connector import ipc_direct

    producer = connectors("ipc", "kv_producer")
    consumer = connectors("ipc", "kv_consumer")
    real = ipc_direct.copy_rows

    def copy_then_lose_the_hold(*args):
        real(*args)
        producer.abort("p")
        poll(producer, lambda s, r, f: s)

    monkeypatch.setattr(ipc_direct, "copy_rows", copy_then_lose_the_hold)
    consume(consumer, "d", produce(producer, "p", [5, 6], num_tokens=8), [20, 21])
    _, recved, failed = poll(consumer, lambda s, r, f: r or f)
    assert recved == set() and "ended its hold while the blocks were being copied" in failed["d"], failed
    assert_clean(producer, consumer)


def test_params_naming_blocks_outside_the_producer_fail_clearly(connectors):
    """kv_transfer_params are the client's to tamper with: block ids past the producer's cache fail
    the load before any copy (a GPU would fault on them), and the hold is released."""
    producer = connectors("ipc", "kv_producer", num_blocks=8)
    consumer = connectors("ipc", "kv_consumer")
    params = produce(producer, "p", [5, 6], num_tokens=8)
    params["remote_block_ids"] = [5, 4096]
    consume(consumer, "d", params, [2, 3])
    _, _, failed = poll(consumer, lambda s, r, f: f)
    assert "outside its memory" in failed["d"]
    poll(producer, lambda s, r, f: s, timeout=2)  # released at once, not left to expire
    assert_clean(producer, consumer)


def test_a_full_hold_board_falls_back_to_asking(connectors):
    """More holds than board slots: the extra ones carry no one-sided offer and are read by asking."""
    producer = connectors("ipc", "kv_producer", board_slots=1)
    consumer = connectors("ipc", "kv_consumer")
    first, second = produce(producer, "p", [5, 6], num_tokens=8), produce(producer, "q", [7], num_tokens=4)
    assert "ipc" in first and "ipc" not in second
    consume(consumer, "d", first, [20, 21])
    consume(consumer, "e", second, [22])
    _, recved, failed = poll(consumer, lambda s, r, f: len(r) == 2 or f)
    assert recved == {"d", "e"}, failed
    assert torch.equal(blocks(consumer, [20, 21, 22]), blocks(producer, [5, 6, 7]))
    poll(producer, lambda s, r, f: s == {"p", "q"})
    assert_clean(producer, consumer)


def test_segments_of_dead_creators_are_swept():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = f"/dev/shm/kvfabric-{dead}-0"
    open(stale, "wb").close()
    live = shm_segment.ShmSegment.create(4096, pin=False)  # sweeps on create
    try:
        assert not os.path.exists(stale) and os.path.exists(live.path)
    finally:
        live.close()
    assert not os.path.exists(live.path)


def test_a_producer_on_another_machine_is_refused(connectors):
    producer = connectors("ipc", "kv_producer", lease_s=60)
    consumer = connectors("ipc", "kv_consumer")
    consumer.machine = "another-boot-id"
    consume(consumer, "d", produce(producer, "p", [5, 6], num_tokens=8), [20, 21])
    _, _, failed = poll(consumer, lambda s, r, f: f)
    assert "on one machine" in failed["d"]
    poll(producer, lambda s, r, f: s, timeout=2)  # the consumer gave the blocks back
    assert_clean(producer, consumer)


def test_kvfabric_up_serves_through_ipc(tmp_path, default_model_dir):
    """Prefill and decode as real processes, the KV through shared memory: same text as offline."""
    import openai

    from engine import LLM, SamplingParams
    from tests.topology import Topology, running

    prompts = ["The capital of France is", "def fibonacci(n):"]
    offline = [o.outputs[0].text for o in LLM(dtype="float32").generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))]
    with running(Topology(tmp_path, kv_connector="ipc")) as (topo,):
        c = openai.OpenAI(base_url=topo.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        texts = [c.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
        assert texts == offline
        s = topo.stats("decode")
        assert s["connector_bytes_received"] > 0 and s["connector_failures"] == 0, s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra,memory", [
    ({}, "device"), ({"direct_read": False}, "device"), ({"cuda_ipc": False}, "device"),
    ({}, "host"), ({"direct_read": False}, "host")],
                         ids=["cuda-ipc", "cuda-ipc-asked", "through-host", "host-cache", "host-cache-asked"])
def test_two_processes_on_one_gpu_move_exact_bytes(extra, memory):
    """A producer process and this one on GPU 0: over CUDA IPC, through the shared pinned ring, and from
    a producer whose cache is in host memory (shared, read in place); one-sided and after asking;
    every payload compared byte for byte."""
    from bench.kv_transfer_2proc import run_two_process

    data = run_two_process(["ipc"], [1 << 20, 64 << 20], repeats=2, extra=extra, device="cuda",
                           producer_memory=memory, shapes=["large", "small"])
    assert data["results"] and all(r.get("bytes_equal") for r in data["results"]), data["results"]


def _no_shared_dev_shm(*a, **k):
    raise FileNotFoundError("No such file or directory")


def _dev_shm_full(fd, offset, length):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where,what,fault,expect", [
    ("ipc_connector", "ShmSegment.open", _no_shared_dev_shm,  # another IPC namespace
     ["could not map the consumer's shared ring", "ipc: host"]),
    ("shm_segment", "os.posix_fallocate", _dev_shm_full,
     ["could not create a 256 MiB shared ring in /dev/shm", "shm_size"]),
], ids=["producer-cannot-map", "dev-shm-full"])
def test_a_ring_that_cannot_be_made_fails_the_load_clearly_and_leaves_nothing(connectors, monkeypatch, where,
                                                                              what, fault, expect):
    import importlib

    producer = connectors("ipc", "kv_producer", lease_s=60, **RING)
    consumer = connectors("ipc", "kv_consumer")
    owner, attr = what.rsplit(".", 1)
    monkeypatch.setattr(getattr(importlib.import_module(f"kv_connector.{where}"), owner), attr, fault)
    consume(consumer, "d", produce(producer, "p", [5, 6], num_tokens=8), [20, 21])
    _, _, failed = poll(consumer, lambda s, r, f: f)
    assert all(e in failed["d"] for e in expect), failed["d"]
    poll(producer, lambda s, r, f: s, timeout=2)  # released, not left to expire
    assert_clean(producer, consumer)
    assert consumer.stats()["rings"] == 0 and _ours() == []


_CONSUMER = """
import json, sys, time, torch
from kv_connector import KVTransferConfig, create_connector
from tests.test_kv_connector import consume
layout, n = json.loads(sys.argv[1]), int(sys.argv[2])
conn = create_connector(KVTransferConfig(kv_connector="ipc", kv_role="kv_consumer",
                                         kv_connector_extra_config={"ring_slots": 2, "ring_slot_bytes": 1 << 20}))
shape = (n + 1, layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
conn.register_kv_cache(torch.zeros(shape), layout)
print("ready", flush=True)  # the params come now: a slow start (CUDA's, on a GPU host) must not expire them
consume(conn, "d", json.loads(sys.stdin.readline()), list(range(1, n + 1)))
time.sleep(120)
"""


def test_a_consumer_killed_mid_load_leaves_the_producer_nothing(connectors):
    """The producer unmaps a dead consumer's ring (2 × peer_idle_s unused), its held blocks expire,
    and nothing of either is left in /dev/shm."""
    n = 256  # 256 blocks of 64 KiB through two 1 MiB slots: 1,024 fills, far longer than the kill takes
    layout = {"block_size": 16, "num_layers": 4, "num_kv_heads": 8, "head_dim": 32}
    producer = connectors("ipc", "kv_producer", num_blocks=n + 1, layout=layout, lease_s=3, peer_idle_s=0.5, **RING)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", _CONSUMER, json.dumps(producer.wire_layout), str(n)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        params = produce(producer, "p", list(range(1, n + 1)), num_tokens=n * 16)
        proc.stdin.write(json.dumps(params) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while producer.stats()["rings"] == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert producer.stats()["rings"] == 1, "the consumer never attached its ring"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sent, _, _ = poll(producer, lambda s, r, f: s and producer.stats()["rings"] == 0, timeout=10)
        assert sent == {"p"} and producer.stats()["rings"] == 0, producer.stats()
        assert_clean(producer)
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"kvfabric-{proc.pid}-")]
    finally:
        proc.kill()
        proc.wait()


def test_a_producer_that_shuts_down_ends_its_holds_for_readers(connectors):
    """Its cache goes with the engine: a reader that already maps the producer's hold board finds the
    hold ended and fails the load at once, instead of copying from memory nobody holds."""
    producer = connectors("ipc", "kv_producer", recv_timeout_s=1)
    consumer = connectors("ipc", "kv_consumer", recv_timeout_s=1)
    consume(consumer, "d", produce(producer, "p", [5], num_tokens=4), [20])
    assert poll(consumer, lambda s, r, f: r or f)[1] == {"d"}  # the board is mapped here now
    params = produce(producer, "q", [6, 7], num_tokens=8)
    producer.shutdown()
    consume(consumer, "e", params, [21, 22])
    _, recved, failed = poll(consumer, lambda s, r, f: r or f, timeout=0.5)
    assert recved == set() and "is not held here" in failed["e"], failed


def test_mappings_beyond_the_limit_go_but_never_those_a_read_uses(connectors, monkeypatch):
    """At most _MAX_MAPPINGS producers' memories stay mapped: older ones are unmapped, never the
    memory and hold board of the read being set up (here the limit is below one read's two)."""
    from kv_connector import ipc_direct

    monkeypatch.setattr(ipc_direct, "_MAX_MAPPINGS", 1)
    consumer = connectors("ipc", "kv_consumer")
    for i, local in enumerate(([20, 21], [22, 23])):
        producer = connectors("ipc", "kv_producer")
        consume(consumer, f"d{i}", produce(producer, "p", [5, 6], num_tokens=8), local)
        _, recved, failed = poll(consumer, lambda s, r, f: r or f)
        assert recved == {f"d{i}"}, failed
        assert torch.equal(blocks(consumer, local), blocks(producer, [5, 6]))
        assert consumer.stats()["ipc_mappings"] == 2  # this read's two; the last producer's are gone
