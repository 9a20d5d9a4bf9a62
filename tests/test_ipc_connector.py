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


def test_a_host_cache_is_shared_and_read_in_place(connectors):
    """A producer's host cache lives in shared memory (allocate_kv_cache): the consumer maps it and
    copies the blocks out, no ring; the name goes at shutdown."""
    producer = connectors("ipc", "kv_producer")
    consumer = connectors("ipc", "kv_consumer")
    seg = producer._cache_seg
    assert seg is not None and producer.kv_cache.data_ptr() == seg.buf.data_ptr() and os.path.exists(seg.path)
    consume(consumer, "d", produce(producer, "p", [9, 3, 4, 5], num_tokens=14), [40, 41, 7, 8])
    _, recved, failed = poll(consumer, lambda s, r, f: r or f)
    assert recved == {"d"}, failed
    assert torch.equal(blocks(consumer, [40, 41, 7, 8]), blocks(producer, [9, 3, 4, 5]))
    s = consumer.stats()
    assert (s["rings"], s["ipc_mappings"]) == (0, 1), s
    poll(producer, lambda s, r, f: s)  # the done ends the lease: the blocks are freed at once
    assert_clean(producer, consumer)
    producer.shutdown()
    assert not os.path.exists(seg.path)


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
    producer = connectors("ipc", "kv_producer", expiry_s=60)
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
@pytest.mark.parametrize("extra,memory", [({}, "device"), ({"cuda_ipc": False}, "device"), ({}, "host")],
                         ids=["cuda-ipc", "through-host", "pinned-producer"])
def test_two_processes_on_one_gpu_move_exact_bytes(extra, memory):
    """A producer process and this one on GPU 0: over CUDA IPC, through the shared pinned ring, and from
    a producer whose cache is pinned host memory; every payload compared byte for byte."""
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

    producer = connectors("ipc", "kv_producer", expiry_s=60, **RING)
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
params, layout, n = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
conn = create_connector(KVTransferConfig(kv_connector="ipc", kv_role="kv_consumer",
                                         kv_connector_extra_config={"ring_slots": 2, "ring_slot_bytes": 1 << 20}))
shape = (n + 1, layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
conn.register_kv_cache(torch.zeros(shape), layout)
consume(conn, "d", params, list(range(1, n + 1)))
time.sleep(120)
"""


def test_a_consumer_killed_mid_load_leaves_the_producer_nothing(connectors):
    """The producer unmaps a dead consumer's ring (2 × peer_idle_s unused), its held blocks expire,
    and nothing of either is left in /dev/shm."""
    n = 256  # 256 blocks of 64 KiB through two 1 MiB slots: 1,024 fills, far longer than the kill takes
    layout = {"block_size": 16, "num_layers": 4, "num_kv_heads": 8, "head_dim": 32}
    producer = connectors("ipc", "kv_producer", num_blocks=n + 1, layout=layout, expiry_s=3, peer_idle_s=0.5, **RING)
    params = produce(producer, "p", list(range(1, n + 1)), num_tokens=n * 16)
    full = {**producer.wire_layout}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _CONSUMER, json.dumps(params), json.dumps(full), str(n)], env=env)
    try:
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
