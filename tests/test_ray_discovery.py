"""The proxy's watched instance file (proxy/discovery.py), which ``kvfabric up --ray`` writes: real
uvicorn and gRPC, fake engines. A set that changes moves new requests to the new instances, and a
request in flight on a removed instance still finishes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from proxy import ProxyConfig, create_app
from proxy.discovery import read_instances, write_instances
from tests.fake_engine_servicer import FakeDecodeServicer, FakePrefillServicer, start_server
from tests.test_proxy import _tokenizer_dir, wait_for


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _run(loop, coro, timeout: float = 30):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def _addresses(url: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in httpx.get(f"{url}/health", timeout=10).json()["instances"]:
        if i["healthy"]:
            out.setdefault(i["role"], []).append(i["address"])
    return out


def test_the_instance_file_replaces_the_set_at_run_time(loop, tmp_path):
    prefill = [FakePrefillServicer(f"p{i}") for i in range(2)]
    decode = [FakeDecodeServicer(f"d{i}") for i in range(2)]
    servers = [_run(loop, start_server(s)) for s in prefill + decode]
    p_addr, d_addr = [a for _, a in servers[:2]], [a for _, a in servers[2:]]
    path = tmp_path / "instances.json"
    write_instances(path, {"prefill": p_addr[:1], "decode": d_addr[:1]})
    cfg = ProxyConfig(served_model_names=["m"], tokenizer_dir=_tokenizer_dir(tmp_path), instances_file=str(path),
                      health_interval_s=0.2, health_timeout_s=1.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), log_level="warning", lifespan="on"))
    loop.call_soon_threadsafe(lambda: loop.create_task(server.serve(sockets=[sock])))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_for(lambda: _addresses(url) == {"prefill": p_addr[:1], "decode": d_addr[:1]}, 30, "first set healthy")
        body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        assert len(decode[0].knobs.requests) == 1

        # A slow request on d0 while the file swaps both roles to the second instances.
        decode[0].knobs.token_delay_s = 0.3
        slow = {}
        t = threading.Thread(target=lambda: slow.update(r=httpx.post(
            f"{url}/v1/completions", json={**body, "max_tokens": 10}, timeout=60)))
        t.start()
        wait_for(lambda: decode[0].knobs.running == 1, 10, "slow request on d0")
        write_instances(path, {"prefill": p_addr[1:], "decode": d_addr[1:]})
        wait_for(lambda: _addresses(url) == {"prefill": p_addr[1:], "decode": d_addr[1:]}, 30, "second set")
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        assert len(decode[1].knobs.requests) == 1 and len(prefill[1].knobs.requests) == 1
        t.join(60)
        assert slow["r"].status_code == 200 and slow["r"].json()["usage"]["completion_tokens"] == 10

        # A file that cannot be read keeps the current set.
        path.write_text("{not json")
        time.sleep(1.5)
        assert _addresses(url) == {"prefill": p_addr[1:], "decode": d_addr[1:]}
    finally:
        server.should_exit = True
        time.sleep(0.5)
        for s, _ in servers:
            _run(loop, s.stop(None))


def test_a_malformed_instance_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"decode": ["no-port"]}')
    with pytest.raises(ValueError, match="decode must be a list of 'host:port' strings"):
        read_instances(path)
    path.write_text('{"workers": []}')
    with pytest.raises(ValueError, match="expected an object with keys among"):
        read_instances(path)
