"""A producer SIGKILLed mid-transfer, for each transport that a frozen producer stops (``nixl``,
``ucx``, and ``ipc`` through its shared ring).

The consumer is a real engine; the producer a real process holding 128 MiB of KV in 256
scattered blocks. Once the consumer reports the transfer posted, the producer is frozen
(SIGSTOP), shown to be mid-transfer (nothing completes for a while), then SIGKILLed. The
request must end with an error within a bound, the engine must keep serving, and nothing may be
left behind: every block back in the pool, no load, READ or receive in flight, no socket,
endpoint or remote agent, no thread once the engine shuts down.

Both processes use UCX over TCP only (``UCX_TLS=tcp``): over CMA or shared memory the consumer
copies straight out of the producer's memory, which a frozen producer does not stop, so the
transfer could finish before the kill and the test would prove nothing.
"""

from __future__ import annotations

import collections
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

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.models.config import TINY_CONFIGS
from kv_connector import KVTransferConfig, create_connector
from tests.test_kv_connector import _connector_param

REPO = Path(__file__).resolve().parents[1]
NAMES = [_connector_param(n) for n in ("nixl", "ucx")]
NUM_BLOCKS = 256  # 16 tokens and 512 KiB each: 128 MiB, ~0.1 s over loopback TCP
RECV_TIMEOUT_S = 5.0
# cuda_copy keeps NIXL's check that a GPU host can still move device memory happy.
TCP_ONLY = "tcp,cuda_copy" if torch.cuda.is_available() else "tcp"

_PRODUCER = textwrap.dedent("""
    import json, sys, time, torch
    from kv_connector import KVTransferConfig, create_connector

    name, layout, n, extra = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    conn = create_connector(KVTransferConfig(kv_connector=name, kv_role="kv_producer", kv_connector_extra_config=extra))
    shape = (n + 1, layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
    conn.register_kv_cache(torch.ones(shape), layout)

    class Req:
        request_id, num_computed_tokens, status = "p", n * layout["block_size"], None
        kv_transfer_params = {"do_remote_decode": True}
    # Descending ids: no two blocks are consecutive, so every block is its own run / descriptor.
    print("PARAMS " + json.dumps(conn.request_finished(Req(), list(range(n, 0, -1)))[1]), flush=True)
    time.sleep(120)
""")


@pytest.fixture(scope="module")
def wide_kv_model(tmp_path_factory) -> Path:
    """Two layers of 16 KV heads × 128: 32 KiB of fp32 KV a token, so 4,096 tokens are 128 MiB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(TINY_CONFIGS["tiny-qwen3"], num_attention_heads=16, num_key_value_heads=16, head_dim=128,
             max_position_embeddings=8192)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "wide-kv-qwen3"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.float32).save_pretrained(str(path))
    return path


def _native_threads() -> collections.Counter:
    task = Path("/proc/self/task")
    return collections.Counter((t / "comm").read_text().strip() for t in task.iterdir())


def _step_until(engine, cond, timeout: float) -> dict:
    finished, deadline = {}, time.monotonic() + timeout
    while not cond(finished):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s; connector: {engine.connector.stats()}")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        time.sleep(0.0005)
    return finished


def _start_producer(name: str, layout: dict, extra: dict) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", _PRODUCER, name, json.dumps(layout), str(NUM_BLOCKS),
                             json.dumps(extra)],
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # NIXL logs to stdout too
        if line.startswith("PARAMS "):
            return proc, json.loads(line.removeprefix("PARAMS "))
    raise AssertionError(f"producer exited with {proc.wait()} before holding its blocks")


# ucx without peer error handling (shared memory allowed): the kill is noticed by recv_timeout_s.
CASES = [pytest.param(p.values[0], {}, marks=p.marks, id=p.values[0]) for p in NAMES] + [
    pytest.param("ucx", {"peer_error_handling": False}, marks=NAMES[1].marks, id="ucx-no-peer-errors"),
    # CPU caches through the ring (not the shared host cache, which the consumer copies by itself):
    # the producer fills it 4 MiB at a time, so freezing it stalls the load.
    pytest.param("ipc", {"ring_slot_bytes": 4 << 20, "share_host_cache": False}, id="ipc")]


def _shm_segments(*pids: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if any(n.startswith(f"kvfabric-{p}-") for p in pids)]


@pytest.mark.parametrize("name,extra", CASES)
def test_producer_killed_mid_transfer_fails_that_request_and_leaks_nothing(name, extra, wide_kv_model, monkeypatch):
    monkeypatch.setenv("UCX_TLS", TCP_ONLY)  # read by both UCX contexts as they are created
    # torch's BLAS and OpenMP pools start on first use; start them before the baseline.
    (torch.randn(1024, 1024) @ torch.randn(1024, 1024)).exp_().softmax(-1).sum()
    threads_before = _native_threads()
    # Policy "fail": the failure itself is under test (recompute is tested in test_disagg_leases.py).
    conn = create_connector(KVTransferConfig(kv_connector=name, kv_role="kv_consumer", kv_load_failure_policy="fail",
                                             kv_connector_extra_config={"recv_timeout_s": RECV_TIMEOUT_S, **extra}))
    engine = LLMEngine(EngineConfig(model=str(wide_kv_model), dtype="float32", device="cpu",
                                    num_kv_blocks=NUM_BLOCKS + 4, max_model_len=(NUM_BLOCKS + 2) * 16),
                       kv_connector=conn)
    proc, params = _start_producer(name, engine.kv_layout, extra)
    try:
        prompt = [3 + i % 500 for i in range(NUM_BLOCKS * 16)]
        engine.add_request("d", prompt, SamplingParams(max_tokens=3, ignore_eos=True), kv_transfer_params=params,
                           output_token_ids=[7])
        _step_until(engine, lambda f: conn.stats()["xfers_in_flight"] == 1, timeout=15)

        proc.send_signal(signal.SIGSTOP)
        frozen, t_end = {}, time.monotonic() + 0.3
        while time.monotonic() < t_end:
            frozen.update({o.request_id: o for o in engine.step() if o.finished})
            time.sleep(0.001)
        s = conn.stats()
        assert not frozen and (s["xfers_in_flight"], s["transfers"]) == (1, 0), s  # mid-transfer, stuck

        proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        out = _step_until(engine, lambda f: "d" in f, timeout=RECV_TIMEOUT_S + 5)["d"]
        took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert out.outputs[0].finish_reason == "abort" and out.error.startswith("KV transfer failed: "), out.error
    assert took < RECV_TIMEOUT_S + 1

    s = engine.stats()
    assert s["num_free_blocks"] == s["num_blocks"] - 1, s
    assert (s["num_running"], s["num_waiting"], s["num_held_for_transfer"]) == (0, 0, 0), s
    c = s["connector"]
    assert (c["loads_in_flight"], c["xfers_in_flight"], c["open_peer_sockets"], c["held_blocks"]) == (0, 0, 0, 0), c
    assert (c["failures"], c["transfers"], c["bytes_received"]) == (1, 0, 0), c
    if name == "nixl":
        assert c["remote_agents"] == 0 and c["registered"], c
    if name == "ipc":
        assert c["rings"] == 0 and not _shm_segments(os.getpid(), proc.pid), c

    # The engine keeps serving: the next request computes its prompt locally.
    engine.add_request("after", prompt[:40], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(_step_until(engine, lambda f: "after" in f, timeout=30)["after"].outputs[0].token_ids) == 2

    engine.shutdown()
    if name == "nixl":
        assert conn.stats()["registered"] is False
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("kv-nixl", "kv-ucx", "kv-zmq"))]
    # UCX's one process-wide event thread ("async") stays for the process's life; nothing else may.
    deadline = time.monotonic() + 2  # native threads are joined as their owners are collected
    while set(_native_threads() - threads_before) - {"async"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(_native_threads() - threads_before) <= {"async"}, _native_threads() - threads_before
