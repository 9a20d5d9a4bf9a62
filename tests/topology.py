"""A real ``kvfabric up`` topology for tests: processes, sockets, gRPC — started and torn down.

Ports are fixed by the test (free ports) so it can talk to every engine's Health RPC directly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml

from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Topology:
    def __init__(self, workdir: Path, colocated: bool = False, kv_connector: str = "zmq",
                 engine: dict | None = None, extra: dict | None = None, proxy: dict | None = None) -> None:
        self.colocated = colocated
        self.proxy_port, self.prefill_port, self.decode_port = free_port(), free_port(), free_port()
        cfg = {
            "dtype": "float32",
            "engine": {"max_model_len": 2048, "kv_cache_bytes": 256 << 20, "max_num_batched_tokens": 512,
                       **(engine or {})},
            "proxy": {"port": self.proxy_port, "health_interval_s": 0.5, **(proxy or {})},
            "prefill": {"ports": [self.prefill_port]},
            "decode": {"ports": [self.decode_port]},
            "kv_transfer_config": {"kv_connector": kv_connector,
                                   "kv_connector_extra_config": {"lease_s": 4, "recv_timeout_s": 3}},
            **(extra or {}),
        }
        self.config_path = workdir / ("colocated.yaml" if colocated else "disagg.yaml")
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = workdir / (self.config_path.stem + ".log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def launch(self) -> "Topology":
        argv = [sys.executable, "-m", "kvfabric.cli", "up", "--config", str(self.config_path)]
        if self.colocated:
            argv.append("--colocated")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def start(self, timeout: float = 240.0) -> "Topology":
        if self.proc is None:
            self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvfabric up exited early:\n{self.log_path.read_text()[-4000:]}")
            if "kvfabric is serving at" in self.log_path.read_text():
                return self
            time.sleep(0.5)
        raise TimeoutError(f"kvfabric up not ready in {timeout} s:\n{self.log_path.read_text()[-4000:]}")

    def _pgrep(self, pattern: str) -> list[int]:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def children(self) -> list[int]:
        """Every process of this topology still alive (matched by its ports, which are unique)."""
        ports = (self.proxy_port, self.prefill_port, self.decode_port)
        return [p for port in ports for p in self._pgrep(f"kvfabric.cli serve .*--port {port}")]

    def pid_of(self, role: str) -> int:
        port = self.prefill_port if role == "prefill" else self.decode_port
        [pid] = self._pgrep(f"kvfabric.cli serve {'colocated' if self.colocated else role} .*--port {port}")
        return pid

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()

    def stats(self, role: str) -> dict:
        port = self.prefill_port if role == "prefill" else self.decode_port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = (pb_grpc.PrefillServiceStub if role == "prefill" else pb_grpc.DecodeServiceStub)(channel)
            reply = stub.Health(pb.HealthRequest(), timeout=10)
        return {"num_running": reply.num_running, "num_waiting": reply.num_waiting,
                "kv_cache_usage": reply.kv_cache_usage, **json.loads(reply.stats_json)}

    def wait_for(self, role: str, predicate, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = self.stats(role)
                if predicate(s):
                    return s
            except grpc.RpcError:
                s = None
            if time.monotonic() > deadline:
                raise AssertionError(f"{role} never reached the expected state; last stats: {s}")
            time.sleep(0.2)


@contextmanager
def running(*topologies: Topology):
    """Start several topologies at once (their model loads overlap), stop them all, check no orphans."""
    try:
        for t in topologies:
            t.launch()
        yield [t.start() for t in topologies]
    finally:
        stop_and_check(*topologies)


def stop_and_check(*topologies: Topology) -> None:
    """Stop the topologies; fail (after killing them) if any of their processes outlived ``up``."""
    leftovers = []
    for t in topologies:
        t.stop()
        leftovers += t.children()
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"orphan processes after shutdown: {leftovers}"
