"""Hardening: nothing on any wire is unpickled, internal ports listen on loopback only, and the
API key is compared in constant time.

The wire check is black-box: a real topology (prefill and decode on the zmq connector, plus
LMCache's server as the remote tier's server) is started, every TCP port any of its processes
listens on is found from /proc, and each one is sent a pickle whose unpickling would create a
marker file — as raw bytes, as zmq frames, and as the body of every gRPC method. Afterwards no
marker exists, every process is alive, and a request still returns the same greedy tokens.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import os
import pickle
import re
import socket
from pathlib import Path

import grpc
import httpx
import pytest
import zmq

from tests.tiny_topology import tiny_topology
from tests.topology import REPO, running

PACKAGES = ("engine", "kv_connector", "storage_tiers", "proxy", "prefill_svc", "decode_svc", "kvfabric",
            "protos", "bench")
GRPC_METHODS = ["/kvfabric.v1.PrefillService/Prefill", "/kvfabric.v1.PrefillService/Abort",
                "/kvfabric.v1.PrefillService/Health", "/kvfabric.v1.DecodeService/Generate",
                "/kvfabric.v1.DecodeService/Abort", "/kvfabric.v1.DecodeService/Health"]


class _Marker:
    """Unpickling this creates ``path`` (os.open through pickle's REDUCE): proof something unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.open, (self.path, os.O_CREAT | os.O_WRONLY, 0o600)


# ---- static: the code base never deserialises with pickle -----------------------------------------

_UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|marshal)\b"), "imports a pickle module"),
    (re.compile(r"\b(recv_pyobj|send_pyobj|recv_serialized)\b"), "pyzmq's pickling helpers"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy loads with allow_pickle"),
]


def _torch_load_without_weights_only(line: str) -> bool:
    return "torch.load(" in line and "weights_only=True" not in line


def test_no_code_unpickles():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                reasons = [why for pattern, why in _UNSAFE if pattern.search(line)]
                if _torch_load_without_weights_only(line):
                    reasons.append("torch.load without weights_only=True")
                found += [f"{path.relative_to(REPO)}:{n}: {why}: {line.strip()}" for why in reasons]
    assert not found, "\n".join(found)


def test_the_static_check_catches_each_pattern():
    assert any(p.search("import pickle") for p, _ in _UNSAFE)
    assert any(p.search("msg = sock.recv_pyobj()") for p, _ in _UNSAFE)
    assert any(p.search("np.load(f, allow_pickle=True)") for p, _ in _UNSAFE)
    assert _torch_load_without_weights_only("state = torch.load(path)")
    assert not _torch_load_without_weights_only("torch.load(path, weights_only=True)")


# ---- dynamic: every listening socket of a real topology ---------------------------------------------

def _listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN that one of ``pids`` holds."""
    inodes = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.append((addr, int(port_hex, 16), inodes[inode]))
    return found


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [d for c in children for d in _descendants(int(c))]


@pytest.fixture(scope="module")
def topo(tmp_path_factory, tiny_model_dir):
    model = tiny_model_dir("tiny-llama", with_tokenizer=True)
    t = tiny_topology(tmp_path_factory.mktemp("hardening"), model, colocated=False,
                      extra={"lmcache_server": {}})
    with running(t):
        yield t


def complete(topo) -> str:
    r = httpx.post(topo.url + "/v1/completions", timeout=120, json={
        "prompt": list(range(20, 60)), "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _send_raw(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(0.5)
        try:
            s.recv(4096)
        except OSError:
            pass


def _send_zmq(ctx: zmq.Context, port: int, payload: bytes) -> None:
    with ctx.socket(zmq.DEALER) as s:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{port}")
        for frames in ([payload], [b"", payload], [payload, payload]):
            s.send_multipart(frames)
        s.poll(300)


def _send_grpc(port: int, payload: bytes) -> list[grpc.StatusCode]:
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method in GRPC_METHODS:
            try:
                if method.endswith("Generate"):
                    list(channel.unary_stream(method)(payload, timeout=5))
                else:
                    channel.unary_unary(method)(payload, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
    return codes


def test_no_internal_socket_unpickles_and_all_listen_on_loopback(topo, tmp_path):
    before = complete(topo)
    pids = _descendants(topo.proc.pid)
    sockets = _listening(pids)
    ports = {port for _, port, _ in sockets}
    # The proxy, two gRPC services, the producer's zmq ROUTER and the LMCache server at least.
    assert {topo.proxy_port, topo.prefill_port, topo.decode_port} <= ports and len(ports) >= 5, sockets
    assert all(_loopback(addr) for addr, _, _ in sockets), f"not loopback: {sockets}"

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)), protocol=2)
    ctx = zmq.Context()
    try:
        for port in sorted(ports - {topo.proxy_port}):
            _send_raw(port, payload)
            _send_zmq(ctx, port, payload)
        for port in (topo.prefill_port, topo.decode_port):
            codes = _send_grpc(port, payload)
            assert grpc.StatusCode.OK not in codes, codes  # a pickle is no valid request
    finally:
        ctx.term()
    r = httpx.post(topo.url + "/v1/completions", content=payload, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text

    assert not marker.exists(), "a process unpickled the payload"
    assert all(Path(f"/proc/{pid}").exists() for pid in pids), "a process died of the payload"
    assert complete(topo) == before  # and it still serves the same greedy tokens


# ---- the API key -----------------------------------------------------------------------------------

def test_api_key_is_compared_in_constant_time(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import proxy.app as app_module

    calls, compare = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    app = FastAPI()
    app.add_middleware(app_module.APIKeyMiddleware, api_key="right-key")
    client = TestClient(app)
    assert client.get("/v1/x", headers={"Authorization": "Bearer wrong-key"}).status_code == 401
    assert client.get("/v1/x", headers={"Authorization": "Bearer right-key"}).status_code == 404  # past the check
    assert client.get("/v1/x").status_code == 401
    assert (b"wrong-key", b"right-key") in calls and (b"right-key", b"right-key") in calls
    source = inspect.getsource(app_module.APIKeyMiddleware)
    assert "compare_digest" in source and not re.search(r"token[^\n]*==|==[^\n]*self\.key", source)
