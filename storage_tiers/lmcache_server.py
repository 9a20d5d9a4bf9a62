"""Start and stop LMCache's standalone cache server, the process behind the ``remote`` tier.

LMCache (0.5.x) ships the server as ``python -m lmcache.v1.server HOST PORT [cpu]``: a TCP server
that keeps every chunk it is sent in one in-memory dict (no capacity, no eviction) and answers
PUT / GET / EXIST / HEALTH. Several engines pointed at one server share whatever any of them put.
Its import of lmcache (torch, numba) takes seconds, so ``start`` waits for the port, not for the
process.

    server = LMCacheServer.start("127.0.0.1", 65432)   # or port=0: pick a free one
    ... RemoteTier("127.0.0.1", server.port, ...) ...
    server.stop()

``python -m storage_tiers.lmcache_server HOST PORT`` runs the same server in the foreground: what
``kvfabric up`` supervises (its ``lmcache_server`` config section) and docker-compose's
``lmcache-server`` service runs. Nothing else here imports lmcache: the child process does, so the
parent only needs it installed.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Return once ``host:port`` accepts connections; raise TimeoutError (or RuntimeError if
    ``proc`` exits first) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"LMCache server exited with status {proc.returncode} before listening on {host}:{port}")
        if port_open(host, port, timeout_s=0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_argv(host: str, port: int, python: str | None = None) -> list[str]:
    """The command line that runs the server in the foreground (``kvfabric up`` supervises it)."""
    return [python or sys.executable, "-m", "storage_tiers.lmcache_server", host, str(port)]


def _socket_options() -> None:
    """Give the unmodified ``lmcache.v1.server`` two socket options it does not set: SO_REUSEADDR,
    so a server restarted after a crash can take its port back while the dead one's connections sit
    in TIME_WAIT (60 s); and TCP_NODELAY on accepted connections, since a GET reply is two writes
    (header, payload) and Nagle holds the second for the client's delayed ACK: measured here,
    ~40 ms per block read (a 27-block hit took 1.5 s instead of a few ms). Patched process-wide,
    which is why the server gets a process of its own."""
    bind, accept = socket.socket.bind, socket.socket.accept

    def bind_reusing(self, address):
        self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return bind(self, address)

    def accept_nodelay(self):
        conn, address = accept(self)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address

    socket.socket.bind, socket.socket.accept = bind_reusing, accept_nodelay


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m storage_tiers.lmcache_server",
                                     description="LMCache's server, as `python -m lmcache.v1.server HOST PORT` "
                                                 "runs it, with SO_REUSEADDR and TCP_NODELAY")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # no reports to LMCache's vendor
    # Everything the server holds is in this process's memory, so there is nothing to flush; and
    # its per-client threads are not daemons, so a KeyboardInterrupt would wait for every engine to
    # disconnect. As PID 1 of a container it would also ignore an unhandled SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os._exit(0))
    _socket_options()
    sys.argv = ["lmcache.v1.server", args.host, str(args.port), "cpu"]
    runpy.run_module("lmcache.v1.server", run_name="__main__", alter_sys=True)


@dataclass
class LMCacheServer:
    host: str
    port: int
    proc: subprocess.Popen
    log_path: str | None = None

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0,
              log_path: str | None = None, python: str | None = None) -> LMCacheServer:
        """Spawn the server and wait until it listens. ``port=0`` picks a free port."""
        port = port or free_port(host)
        if port_open(host, port):
            raise RuntimeError(f"{host}:{port} is already in use")
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(server_argv(host, port, python),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={"LMCACHE_TRACK_USAGE": "false",  # no reports to LMCache's vendor
                                         **os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")},
                                    start_new_session=True)
        finally:
            if log_path:
                out.close()
        server = cls(host, port, proc, log_path)
        try:
            wait_for_port(host, port, timeout_s, proc)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def url(self) -> str:
        return f"lm://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate (then kill) the server; idempotent. Everything it held is gone."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)

    def __enter__(self) -> LMCacheServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
