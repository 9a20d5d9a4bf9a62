"""Prefix-aware routing: the proxy's hasher equals the engine's, the index follows KV events, and on
a real 2 prefill + 2 decode ``kvfabric up`` a repeated prefix goes to the instance that holds it —
also after that instance is killed and restarted."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from engine.block_hash import extend_block_hashes, model_hash_seed
from proxy.config import ProxyConfig
from proxy.prefix_index import PrefixIndex, PromptHasher
from proxy.router import Router
from tests.topology import REPO, free_port

MODEL = "SmolLM2-135M-Instruct"


def test_the_proxy_hashes_prompts_exactly_as_the_engine():
    rng = random.Random(0)
    for _ in range(50):
        block_size = rng.choice([1, 4, 16, 32])
        tokens = [rng.randrange(2**31) for _ in range(rng.randrange(200))]
        seed = model_hash_seed(f"model-{rng.random()}", "float32", block_size, "block-major-v1")
        req = type("R", (), {})()
        req.prompt_token_ids, req.output_token_ids, req.block_hashes = tokens, [], []
        extend_block_hashes(req, block_size, seed)
        assert PromptHasher(seed, block_size).hashes(tokens) == req.block_hashes


def test_the_index_matches_leading_blocks_only_and_clears_per_instance():
    idx = PrefixIndex()
    idx.stored("a", [b"1", b"2", b"3"])
    idx.stored("b", [b"1", b"3"])
    assert (idx.matched_blocks("a", [b"1", b"2", b"3", b"4"]), idx.matched_blocks("b", [b"1", b"2", b"3"])) == (3, 1)
    idx.removed("a", [b"2"])
    assert idx.matched_blocks("a", [b"1", b"2", b"3"]) == 1
    idx.cleared("b")
    assert idx.matched_blocks("b", [b"1"]) == 0 and idx.matched_blocks("a", [b"1"]) == 1 and idx.num_blocks("b") == 0


def _router(policy: str) -> Router:
    r = Router(ProxyConfig(decode_addrs=["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], routing_policy=policy))
    for i in r.decode:
        i.healthy = True
    return r


def test_round_robin_turns_and_session_affinity_sticks():
    asyncio.run(_round_robin_and_sessions())


async def _round_robin_and_sessions():
    rr = _router("round_robin")
    assert [rr.pick_decode(True).address[-1] for _ in range(4)] == ["1", "2", "3", "1"]
    pr = _router("prefix")  # nothing cached anywhere: the session decides, else the least loaded
    first = pr.pick_decode(True, session="alice")
    first.in_flight += 5  # now busier than the others: least load alone would avoid it
    assert pr.pick_decode(True, session="alice") is first
    assert pr.pick_decode(True, session="bob") is not first
    assert ("decode", first.address, "session") in pr.decisions
    with pytest.raises(ValueError, match="routing_policy"):
        ProxyConfig(decode_addrs=["x:1"], routing_policy="random")
    for r in (rr, pr):
        await r.stop()


# ---- the real topology ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fabric(tmp_path_factory, default_model_dir):
    work = tmp_path_factory.mktemp("routing")
    ports = {"proxy": free_port(), "prefill": [free_port(), free_port()], "decode": [free_port(), free_port()]}
    cfg = {"dtype": "float32",
           "engine": {"max_model_len": 1024, "kv_cache_bytes": 64 << 20, "max_num_batched_tokens": 512},
           "proxy": {"port": ports["proxy"], "health_interval_s": 0.5, "routing_policy": "prefix"},
           "prefill": {"instances": 2, "ports": ports["prefill"]},
           "decode": {"instances": 2, "ports": ports["decode"]},
           "kv_transfer_config": {"kv_connector": "zmq", "kv_connector_extra_config": {"expiry_s": 4}},
           "kv_events_config": {"enable_kv_cache_events": True}}
    path = work / "routing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(work / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kvfabric.cli", "up", "--config", str(path)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{ports['proxy']}"
    try:
        deadline = time.monotonic() + 300
        while "kvfabric is serving at" not in (work / "up.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (work / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url, ports
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def _complete(url: str, prompt: list[int]) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                                 "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _health(url: str) -> dict:
    return {i["address"]: i for i in httpx.get(url + "/health", timeout=10).json()["instances"]}


def _wait(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def _prefill_holding(url: str, blocks: int) -> str:
    return _wait(lambda: next((a for a, i in _health(url).items() if i["role"] == "prefill"
                               and i.get("cached_blocks", 0) >= blocks), None), what="the index to learn the prefix")


def test_a_repeated_prefix_goes_to_the_instance_that_holds_it(fabric):
    url, ports = fabric
    shared = list(range(1000, 1160))  # ten full blocks
    first = _complete(url, shared + [7, 8, 9])
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    holder = _prefill_holding(url, 10)
    for k in range(4):  # least load would alternate between the two prefill instances
        again = _complete(url, shared + [20 + k] * 5)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 160, again["usage"]
    metrics = httpx.get(url + "/metrics", timeout=10).text
    line = next(m for m in metrics.splitlines() if m.startswith("kvfabric_routing_decisions_total{")
                and f'instance="{holder}"' in m and 'reason="prefix"' in m and 'role="prefill"' in m)
    assert float(line.rsplit(" ", 1)[1]) >= 4

    # Kill the holder: `up` restarts it, its old blocks leave the index, and routing carries on.
    port = int(holder.rsplit(":", 1)[1])
    [pid] = [int(p) for p in subprocess.run(["pgrep", "-f", f"kvfabric.cli serve prefill .*--port {port}"],
                                            capture_output=True, text=True).stdout.split()]
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: _health(url)[holder]["state"] != "healthy", what="the proxy to notice")
    _wait(lambda: _health(url)[holder]["state"] == "healthy" and _health(url)[holder]["cached_blocks"] == 0,
          timeout=240, what="the restarted instance, with an empty index entry")
    after = _complete(url, shared + [99])
    assert after["choices"][0]["finish_reason"] == "length"
    # Whoever served it now holds the prefix again, and the next repeat hits it.
    _prefill_holding(url, 10)
    assert _complete(url, shared + [98])["usage"]["prompt_tokens_details"]["cached_tokens"] >= 160


@pytest.mark.parametrize("with_epoch", [True, False], ids=["new-epoch", "sequence-restart"])
def test_the_follower_reads_an_engine_publisher_and_forgets_a_restarted_one(with_epoch):
    """The proxy's subscriber against the engine's real publisher: catch-up by replay, live events,
    and a publisher restarted on the same endpoint (its sequence starts again) clears the instance."""
    from engine.kv_events import KVEvents, KVEventsConfig
    from proxy.prefix_index import EventFollower

    port, replay_port = free_port(), free_port()
    cfg = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"tcp://127.0.0.1:{port}",
                         replay_endpoint=f"tcp://127.0.0.1:{replay_port}")
    addr = "127.0.0.1:9"

    def publish(events: KVEvents, hashes: list[bytes]) -> None:
        events.collector.stored(hashes, None, list(range(16 * len(hashes))), 16)
        events.flush()

    async def scenario() -> None:
        follower = EventFollower()
        first = KVEvents(cfg, "CPU")
        try:
            publish(first, [b"a" * 32, b"b" * 32])  # before anyone subscribed: only the replay has it
            info = {"kv_events_endpoint": cfg.endpoint, "kv_events_replay_endpoint": cfg.replay_endpoint,
                    "kv_events_epoch": first.epoch}
            follower.update(addr, info)
            await _until(lambda: follower.index.num_blocks(addr) == 2)
            await asyncio.sleep(0.3)
            publish(first, [b"c" * 32])
            await _until(lambda: follower.index.num_blocks(addr) == 3)
            first.shutdown()
            second = KVEvents(cfg, "CPU")  # same endpoint, seq from 0, AllBlocksCleared first
            try:
                await asyncio.sleep(0.5)
                publish(second, [b"d" * 32])
                if with_epoch:  # the health check tells the follower of the new process
                    follower.update(addr, {**info, "kv_events_epoch": second.epoch})
                await _until(lambda: follower.index.matched_blocks(addr, [b"d" * 32]) == 1
                             and follower.index.num_blocks(addr) == 1)
            finally:
                second.shutdown()
        finally:
            if first.publisher._thread.is_alive():
                first.shutdown()
            await follower.close()

    asyncio.run(scenario())


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
