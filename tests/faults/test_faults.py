"""Fault injection under load: one fault per scenario, injected while 32 streaming requests from
the conversation trace run against two prefill and two decode instances (``kvfabric up``).

After each: every request has its exact greedy text or an error (never a 200 with other tokens);
every engine is back to its starting free blocks with nothing held within one lease; no new
/dev/shm segment is left; the proxy serves again within ``RECOVERY_LIMIT_S``; a killed instance
is restarted by ``up`` and back in rotation. ``KVFABRIC_FAULTS_REPEAT=N`` runs each N times;
``KVFABRIC_FAULTS_REPORT=path.json`` writes the outcomes (bench/reliability.py makes the table).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from tests.faults.cluster import (LEASE_S, RECOVERY_LIMIT_S, Cluster, Load, check_answers, check_no_shm_left,
                                  greedy_answers, probe, shm_entries, trace_jobs, wait_engines_clean)

REPEAT = int(os.environ.get("KVFABRIC_FAULTS_REPEAT", "1"))
CONCURRENCY = 32
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def jobs(tiny_model_dir):
    model = tiny_model_dir("tiny-llama", with_tokenizer=True)
    js = trace_jobs(CONCURRENCY + 1)
    greedy_answers(model, js)
    return js


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, jobs):
    c = Cluster(tmp_path_factory.mktemp("faults"), tiny_model_dir("tiny-llama", with_tokenizer=True))
    try:
        yield c.start()
    finally:
        c.stop()
        write_report()


def write_report() -> None:
    """Every scenario's outcomes so far (of this module and test_disk_tier's) to the report file."""
    if os.environ.get("KVFABRIC_FAULTS_REPORT") and RESULTS:
        with open(os.environ["KVFABRIC_FAULTS_REPORT"], "w") as f:
            json.dump(RESULTS, f, indent=1)


async def _after_first_tokens(load: Load, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while load.first_tokens < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _kill(role, index, sig=signal.SIGKILL):
    async def fault(cluster, load):
        await _after_first_tokens(load, 8)
        cluster.signal(role, index, sig)
    return fault


def _stop_for(targets, seconds, wait_tokens=8):
    async def fault(cluster, load):
        await _after_first_tokens(load, wait_tokens)
        pids = [cluster.signal(role, i, signal.SIGSTOP) for role, i in targets]
        try:
            await asyncio.sleep(seconds)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
    return fault


async def _abort_storm(cluster, load):
    """Half the clients leave after their third token (Load.leave)."""


def _abort_waiting_for_kv():
    """Both prefills freeze just as streams get their first token, so the decodes wait for KV that
    cannot come; every client still waiting leaves; then the prefills resume."""
    async def fault(cluster, load):
        await _after_first_tokens(load, 4)
        pids = [cluster.signal("prefill", i, signal.SIGSTOP) for i in (0, 1)]
        await asyncio.sleep(0.5)
        for task in asyncio.all_tasks():
            if task.get_name().startswith("job-") and not task.done():
                task.cancel()
        await asyncio.sleep(0.5)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    return fault


def _peer_closes_mid_read():
    """Peers of each producer's KV socket that hang up mid-message, over and over during the load:
    half a ZMTP greeting then close, and a zmq read for a request that leaves before the reply."""
    async def fault(cluster, load):
        import socket

        import zmq

        from tests.test_hardening import _listening

        await _after_first_tokens(load, 4)
        pids = [cluster.pid("prefill", p) for p in cluster.ports["prefill"]]
        kv_ports = {port for _, port, _ in _listening([p for p in pids if p])} - set(cluster.ports["prefill"])
        assert kv_ports, "no producer KV socket found"
        ctx = zmq.Context()
        try:
            for _ in range(20):
                for port in kv_ports:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                        s.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f\x03")  # the greeting, cut short
                    d = ctx.socket(zmq.DEALER)
                    d.setsockopt(zmq.LINGER, 0)
                    d.connect(f"tcp://127.0.0.1:{port}")
                    d.send(b'{"op": "read", "xfer": 1, "request_id": "gone", "first": 0, "count": 4, "layout": {}}')
                    d.close()
                await asyncio.sleep(0.05)
        finally:
            ctx.term()
    return fault


SCENARIOS = {
    "sigkill-prefill": (_kill("prefill", 0), set()),
    "sigkill-decode": (_kill("decode", 1), set()),
    "sigstop-prefill-past-lease": (_stop_for([("prefill", 1)], LEASE_S + 2), set()),
    "abort-storm": (_abort_storm, set(range(0, CONCURRENCY, 2))),
    "abort-waiting-for-remote-kv": (_abort_waiting_for_kv(), set()),
    "proxy-restart": (_kill("proxy", 0), set()),
    "transport-peer-closes-mid-read": (_peer_closes_mid_read(), set()),
    "decode-backlog-past-lease": (_stop_for([("decode", 0), ("decode", 1)], LEASE_S + 2), set()),
}


@pytest.mark.parametrize("repeat", range(REPEAT))
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_under_load(name, repeat, cluster, jobs):
    fault, leave = SCENARIOS[name]
    load_jobs, probe_job = jobs[:CONCURRENCY], jobs[CONCURRENCY]
    assert wait_until(cluster.all_healthy, 120), "the topology is not fully healthy before the fault"
    baseline = {port: cluster.stats(role, port)["num_blocks"] - 1 for role, port in cluster.engines()}
    shm_before = shm_entries()
    pids_before = {(r, p): cluster.pid(r, p) for r, p in cluster.engines()}
    load = Load(cluster, load_jobs, leave=leave)
    started = time.monotonic()
    asyncio.run(load.run(fault))
    load_done = time.monotonic()
    counts = check_answers(load_jobs, load.outcomes)
    recovery = probe(cluster, probe_job, RECOVERY_LIMIT_S)
    assert wait_until(cluster.all_healthy, 120), "a restarted instance did not rejoin"
    restarted = sum(cluster.pid(r, p) != pid for (r, p), pid in pids_before.items())
    wait_engines_clean(cluster, baseline)
    check_no_shm_left(shm_before, [*pids_before.values(), *cluster.all_pids()])
    RESULTS.append({"scenario": name, "repeat": repeat, **counts, "blocks_leaked": 0,
                    "recovery_s": round(recovery, 2), "restarted_instances": restarted,
                    "load_s": round(load_done - started, 1)})


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False
