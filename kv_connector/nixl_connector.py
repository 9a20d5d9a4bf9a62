"""KV hand-off over NVIDIA NIXL (UCX backend): the consumer READs held blocks straight from the
producer's registered KV cache; a small ZeroMQ side channel carries the handshake and the pins.

Each engine registers its whole cache with its own NIXL agent (DRAM for a CPU cache, VRAM for a
GPU one). Wire (side channel: JSON frames plus raw bytes, nothing pickled):

    consumer DEALER                                          producer ROUTER (kv_ip:kv_port)
    {"op": "hello", "layout"}                          ──▶
                                                       ◀──   [{"op": "hello", "agent", "layout",
                                                              "base", "mem_type", "device"},
                                                              raw NIXL agent metadata]
    check layout (mismatch: every load on this peer fails, its blocks are released);
    add_remote_agent(metadata) — once per producer, kept until the peer fails or idles out
    {"op": "read", "xfer", "request_id", "first",      ──▶   pin the held blocks for lease_s
     "count", "reader", "lease_s"}
                                                       ◀──   [{"op": "accept", "xfer"}, block ids (int64)]
                                                              or {"op": "error", "xfer", "msg"}
    NIXL READ: one descriptor per run of blocks consecutive on both sides, remote → local
    cache, notification {"op": "done", ...} on completion ──▶ (NIXL notif) release → finished_sending
    {"op": "release", "request_id", "reader"} (abort / failure, after our READ is settled) ──▶ same

The producer never waits on a consumer: a pin is a lease that ends with the ``done``
notification, a ``release``, or ``lease_s`` (the consumer's own ``recv_timeout_s`` doubled, so
the consumer has given up — and cancelled its READ — well before). Blocks are freed once the
hold is released (or expired) and no lease is open, so nothing leaks when a consumer vanishes.

One IO thread per connector owns the agent and every socket (NIXL agents are used unlocked);
the scheduler thread talks to it through a command queue. ``abort`` returns only once the
request's READ is cancelled or finished, so no byte lands in its blocks afterwards. While a READ
runs the thread spins (50 µs naps) on its state, so completion is seen within ~0.1 ms, not at the
next 1 ms poll; otherwise it sleeps in ``zmq.poll``.

A READ that fails or stays unfinished for ``recv_timeout_s`` means the producer (or the UCX
connection to it) is gone: every load on it fails, and its remote agent and socket are dropped
*before* the failures are reported, so an engine that sees the error sees nothing of the peer
left. A fresh handshake happens with the next load.

UCX backend parameters: NIXL's UCX backend defaults to peer error handling (needed to notice a
dead producer), and UCX disables GET over ``cuda_ipc`` on GPUs without NVLink, so a READ between
two processes on one PCIe GPU fell back to TCP (0.25–0.42 GB/s measured on an H100). The
connector therefore passes ``engine_config: CUDA_IPC_ENABLE_GET_ZCOPY=y`` (NIXL leaves an
explicit ``UCX_*`` environment variable alone, so the environment still wins).

Extra config: ``lease_s`` (30), ``max_held_fraction`` (0.5), ``recv_timeout_s`` (10: no side-channel answer or an
unfinished READ for this long fails the load), ``peer_idle_s`` (30: an idle producer's socket
and remote agent are dropped), ``backends`` (["UCX"]), ``backend_params`` ({backend: {param:
value}}, merged over the defaults above), ``advertise_host``.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from kv_connector.base import KVConnectorRole, KVTransferConfig
from kv_connector.handoff import HandoffConnector, Load, layout_mismatch

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 20  # nothing in flight: how soon shutdown and notifications are noticed
_BUSY_POLL_MS = 1  # a lease in flight: how soon the producer sees the done notification
_SPIN_S = 50e-6  # a READ in flight: its completion is polled, not signalled
# Without NVLink UCX turns GET over cuda_ipc off, and a READ between two processes on one GPU
# falls back to TCP. Upstream NIXL turns it back on too (ai-dynamo/nixl#2208); asking explicitly
# keeps wheels that predate that fix fast.
DEFAULT_BACKEND_PARAMS = {"UCX": {"engine_config": "CUDA_IPC_ENABLE_GET_ZCOPY=y"}}


def nixl_api():
    """(nixl_agent, nixl_agent_config): the ``nixl`` meta package, else a concrete CUDA build.

    ``nixl`` picks ``nixl_cu12``/``nixl_cu13`` from the CUDA that torch was built with; a CPU
    torch reports none, so a lone ``nixl-cu12`` install is imported directly.
    """
    for mod in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            api = __import__(mod, fromlist=["nixl_agent"])
            return api.nixl_agent, api.nixl_agent_config
        except ImportError:
            continue
    raise ImportError("NIXL is not installed: pip install 'kvfabric[transports]' (nixl-cu12)")


def paired_runs(remote: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start positions, lengths) of the runs whose ids are consecutive on both sides."""
    if len(remote) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.flatnonzero((np.diff(remote) != 1) | (np.diff(local) != 1)) + 1
    starts = np.concatenate(([0], brk)).astype(np.int64)
    return starts, np.diff(np.append(starts, len(remote)))


def _descs(base: int, ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, block_bytes: int,
           device: int) -> np.ndarray:
    """Nx3 (address, length, device) rows, one per run."""
    out = np.empty((len(starts), 3), dtype=np.uint64)
    out[:, 0] = base + ids[starts].astype(np.uint64) * np.uint64(block_bytes)
    out[:, 1] = lens.astype(np.uint64) * np.uint64(block_bytes)
    out[:, 2] = device
    return out


class NixlConnector(HandoffConnector):
    name = "nixl"

    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__(config)
        self._nixl_agent, self._nixl_config = nixl_api()
        self.recv_timeout_s = float(config.extra("recv_timeout_s", 10.0))
        self.peer_idle_s = float(config.extra("peer_idle_s", 30.0))
        self.backends = list(config.extra("backends", ["UCX"]))
        given = config.extra("backend_params", {}) or {}
        self.backend_params = {b: {**DEFAULT_BACKEND_PARAMS.get(b, {}),
                                   **{k: str(v) for k, v in given.get(b, {}).items()}} for b in self.backends}
        self._ctx = zmq.Context()
        self._io: _Io | None = None

    def _start_transport(self) -> None:
        self._io = _Io(self)
        self._io.start()

    def _endpoint(self) -> tuple[str, int]:
        host = self.config.extra("advertise_host", None) or self.config.kv_ip
        if host in ("0.0.0.0", "*", ""):
            host = socket.gethostbyname(socket.gethostname())
        return host, self._io.port

    def _start_load(self, load: Load) -> None:
        self._io.submit(load)

    def _cancel_load(self, request_id: str) -> None:
        self._io.cancel(request_id)

    def _send_control(self, params: dict[str, Any], msg: dict[str, Any]) -> None:
        if self._io is not None:
            self._io.command("send", (params["remote_host"], int(params["remote_port"])), msg)

    def _stop_transport(self) -> None:
        if self._io is not None:
            self._io.stop()
        self._ctx.term()

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        io = self._io
        s.update(open_peer_sockets=io.num_peers if io else 0, remote_agents=io.num_agents if io else 0,
                 xfers_in_flight=io.num_xfers if io else 0, open_leases=io.num_leases if io else 0,
                 registered=bool(io and io.registered))
        return s


@dataclass(eq=False)
class _Xfer:
    id: int
    load: Load
    local_ids: np.ndarray
    handle: Any = None  # the posted NIXL READ
    posted_at: float = 0.0
    cancelled: bool = False
    settled: threading.Event = field(default_factory=threading.Event)  # no byte can land any more


class _Peer:
    def __init__(self, ctx: zmq.Context, host: str, port: int) -> None:
        self.name = f"{host}:{port}"
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 500)  # let a last release leave before close
        self.sock.connect(f"tcp://{host}:{port}")
        self.agent: str | None = None  # set by the hello answer
        self.hello_sent = False
        self.remote: dict[str, Any] = {}
        self.waiting: list[_Xfer] = []  # loads waiting for the hello answer
        self.asked: dict[int, _Xfer] = {}  # reads waiting for accept/error
        self.reading: dict[int, _Xfer] = {}  # READs posted
        self.last_heard = time.monotonic()
        self.asked_since = 0.0  # oldest unanswered message

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.asked or self.reading)


class _ReadPin:
    """A producer's pin on held blocks while one consumer READs them: a HoldTable tracker."""

    def __init__(self, lease_s: float) -> None:
        self.deadline = time.monotonic() + lease_s
        self.ended = False

    @property
    def done(self) -> bool:
        return self.ended or time.monotonic() > self.deadline


class _Io(threading.Thread):
    def __init__(self, conn: NixlConnector) -> None:
        super().__init__(name=f"kv-nixl-{conn.engine_id[:8]}", daemon=True)
        self.conn = conn
        self._stop_event = threading.Event()
        self._cmds: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _live and every _Xfer's handle/cancelled
        self._live: dict[str, _Xfer] = {}
        self._ids = itertools.count(1)
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._leases: dict[str, _ReadPin] = {}  # producer: "reader:xfer" -> lease
        self.num_peers = self.num_agents = self.num_xfers = self.num_leases = 0
        cache = conn.kv_cache
        self.mem_type = "DRAM" if cache.device.type == "cpu" else "VRAM"
        self.device = 0 if cache.device.type == "cpu" else int(cache.device.index or 0)
        self.base = int(cache.data_ptr())
        self.block_bytes = int(conn.wire_layout["block_bytes"])
        self.agent_name = f"kvfabric-{conn.engine_id}"
        # Created here so a failure (no UCX plugin, registration refused) raises from register_kv_cache.
        self.agent = conn._nixl_agent(self.agent_name, conn._nixl_config(backends=[]))
        missing = [b for b in conn.backends if b not in self.agent.get_plugin_list()]
        if missing:
            raise RuntimeError(f"NIXL backends {missing} unavailable; plugins: {self.agent.get_plugin_list()}")
        for b in conn.backends:
            self.agent.create_backend(b, conn.backend_params[b])
        self._reg = self.agent.register_memory(cache)
        self.registered = True
        self.md = self.agent.get_agent_metadata()
        self.router = None
        self.port = 0
        if conn.role != KVConnectorRole.CONSUMER:
            self.router = conn._ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(f"tcp://{conn.config.kv_ip}:{conn.config.kv_port}")
            self.port = int(self.router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        addr = f"inproc://kv-nixl-wake-{id(self)}"
        self._wake_rx = conn._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(addr)
        self._wake_tx = conn._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(addr)
        self._wake_lock = threading.Lock()

    # ---- scheduler-thread API ---------------------------------------------------------------------

    def submit(self, load: Load) -> None:
        x = _Xfer(next(self._ids), load, np.asarray(load.local_block_ids, dtype=np.int64))
        with self._lock:
            self._live[load.request_id] = x
        self.command("load", x, None)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            x = self._live.pop(request_id, None)
            if x is None:
                return
            x.cancelled = True
            posted = x.handle is not None
        if posted:  # the READ may still be writing into the request's blocks: wait until it cannot
            self.command("cancel", x, None)
            if not x.settled.wait(self.conn.recv_timeout_s + 5):
                logger.error("NIXL READ of %s did not settle after abort", request_id)

    def command(self, kind: str, a: Any, b: Any) -> None:
        self._cmds.put((kind, a, b))
        with self._wake_lock:
            if not self._wake_tx.closed:
                self._wake_tx.send(b"", zmq.NOBLOCK)

    def stop(self) -> None:
        self._stop_event.set()
        self.command("stop", None, None)
        self.join()
        with self._wake_lock:
            self._wake_tx.close(linger=0)

    # ---- IO thread ------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                poller = zmq.Poller()
                poller.register(self._wake_rx, zmq.POLLIN)
                if self.router is not None:
                    poller.register(self.router, zmq.POLLIN)
                for p in self._peers.values():
                    poller.register(p.sock, zmq.POLLIN)
                reading = self.num_xfers > 0
                ready = dict(poller.poll(0 if reading else _BUSY_POLL_MS if self._leases else _IDLE_POLL_MS))
                if reading and not ready:
                    time.sleep(_SPIN_S)
                if self._wake_rx in ready:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                self._run_commands()
                if self.router is not None and self.router in ready:
                    self._serve()
                for p in list(self._peers.values()):
                    if p.sock in ready:
                        self._drain(p)
                self._check_reads()
                self._check_notifs()
                self._check_peers()
        finally:
            self._close()

    def _close(self) -> None:
        for p in list(self._peers.values()):
            for x in list(p.reading.values()):
                self._settle(x)
        for key in list(self._peers):
            self._close_peer(key, linger=0)
        if self.router is not None:
            self.router.close()
        self._wake_rx.close(linger=0)
        try:
            self.agent.deregister_memory(self._reg)
        except Exception as e:  # noqa: BLE001 - shutdown goes on; say what was left
            logger.error("NIXL deregister_memory failed at shutdown: %s", e)
        self.registered = False
        self.agent = None

    # ---- producer side ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            ident = frames[0]
            try:
                msg = json.loads(frames[1])
                op = msg["op"]
                if op == "hello":
                    self._reply(ident, {"op": "hello", "agent": self.agent_name, "layout": self.conn.wire_layout,
                                        "base": self.base, "mem_type": self.mem_type, "device": self.device},
                                self.md)
                elif op == "read":
                    self._serve_read(ident, msg)
                elif op in ("done", "release"):
                    self._end(msg)
                else:
                    self.conn.on_control(msg)  # renew
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("malformed side-channel message ignored: %s", e)
            except zmq.ZMQError as e:
                logger.warning("consumer went away before its answer: %s", e)

    def _reply(self, ident: bytes, msg: dict[str, Any], raw: bytes | None = None) -> None:
        frames = [ident, json.dumps(msg).encode()] + ([raw] if raw is not None else [])
        self.router.send_multipart(frames)

    def _serve_read(self, ident: bytes, msg: dict[str, Any]) -> None:
        xfer, rid = int(msg["xfer"]), str(msg["request_id"])
        ids = self.conn.holds.pin(rid, int(msg["first"]), int(msg["count"]))
        if isinstance(ids, str):
            self._reply(ident, {"op": "error", "xfer": xfer, "msg": ids})
            return
        lease = _ReadPin(float(msg.get("lease_s", 20.0)))
        self._leases[f"{msg['reader']}:{xfer}"] = lease
        self.num_leases = len(self._leases)
        self.conn.holds.unpin(rid, [lease])  # the lease, not the pin, now keeps the blocks
        try:
            self._reply(ident, {"op": "accept", "xfer": xfer}, np.asarray(ids, dtype=np.int64).tobytes())
        except zmq.ZMQError:
            lease.ended = True
            raise
        self.conn.count("bytes_sent", len(ids) * self.block_bytes)

    def _end(self, msg: dict[str, Any]) -> None:
        op, rid = msg["op"], str(msg["request_id"])
        lease = self._leases.pop(f"{msg.get('reader')}:{msg.get('xfer')}", None)
        if lease is not None:
            lease.ended = True
            self.num_leases = len(self._leases)
        self.conn.on_control({"op": op, "request_id": rid})

    def _check_notifs(self) -> None:
        if self.router is None:
            return
        for msgs in self.agent.get_new_notifs().values():
            for m in msgs:
                try:
                    self._end(json.loads(m))
                except (ValueError, KeyError, TypeError) as e:
                    logger.warning("malformed NIXL notification ignored: %s", e)
        if self._leases:
            for key in [k for k, lease in self._leases.items() if lease.done]:
                del self._leases[key]
            self.num_leases = len(self._leases)

    # ---- consumer side ----------------------------------------------------------------------------------

    def _peer(self, key: tuple[str, int]) -> _Peer:
        p = self._peers.get(key)
        if p is None:
            p = self._peers[key] = _Peer(self.conn._ctx, *key)
            self.num_peers = len(self._peers)
        return p

    def _send(self, p: _Peer, msg: dict[str, Any]) -> None:
        p.sock.send(json.dumps(msg).encode())

    def _ask(self, p: _Peer, msg: dict[str, Any]) -> None:
        if not (p.asked or (p.hello_sent and p.agent is None)):
            p.asked_since = time.monotonic()
        self._send(p, msg)

    def _run_commands(self) -> None:
        while not self._cmds.empty():
            kind, a, b = self._cmds.get()
            if kind == "load" and not a.cancelled:
                p = self._peer((a.load.remote_host, a.load.remote_port))
                if p.agent is None:
                    p.waiting.append(a)
                    if not p.hello_sent:
                        self._ask(p, {"op": "hello", "layout": self.conn.wire_layout})
                        p.hello_sent = True
                else:
                    self._ask_read(p, a)
            elif kind == "send":
                self._send(self._peer(a), b)
            elif kind == "cancel":
                self._settle(a)

    def _ask_read(self, p: _Peer, x: _Xfer) -> None:
        p.asked[x.id] = x
        self._ask(p, {"op": "read", "xfer": x.id, "request_id": x.load.remote_request_id, "first": x.load.first,
                      "count": x.load.count, "reader": self.conn.engine_id,
                      "lease_s": 2 * self.conn.recv_timeout_s + 1})

    def _drain(self, p: _Peer) -> None:
        while True:
            try:
                frames = p.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            p.last_heard = time.monotonic()
            try:
                msg = json.loads(frames[0])
                if msg["op"] == "hello":
                    self._on_hello(p, msg, frames[1])
                elif msg["op"] in ("accept", "error"):
                    self._on_answer(p, msg, frames[1] if len(frames) > 1 else b"")
            except (ValueError, KeyError, TypeError, IndexError) as e:
                logger.warning("malformed answer from producer %s ignored: %s", p.name, e)
            if p.asked or (p.hello_sent and p.agent is None):
                p.asked_since = time.monotonic()

    def _on_hello(self, p: _Peer, msg: dict[str, Any], md: bytes) -> None:
        waiting, p.waiting = p.waiting, []
        why = layout_mismatch(self.conn.wire_layout, msg.get("layout", {}), f"producer {p.name}")
        if why is None:
            try:
                p.agent = self.agent.add_remote_agent(md)
                p.remote = msg
                self.num_agents = sum(q.agent is not None for q in self._peers.values())
            except Exception as e:  # noqa: BLE001 - NIXL raises its own types
                why = f"NIXL could not load producer {p.name}'s agent metadata: {e}"
        if why is not None:
            p.hello_sent = False  # ask again with the next load: the producer may be fixed by then
            for x in waiting:
                self._fail(p, x, why)
            return
        for x in waiting:
            if not x.cancelled:
                self._ask_read(p, x)

    def _on_answer(self, p: _Peer, msg: dict[str, Any], raw: bytes) -> None:
        x = p.asked.pop(int(msg["xfer"]), None)
        if x is None:
            return
        if msg["op"] == "error":
            self._fail(p, x, f"producer {p.name} refused the read: {msg.get('msg')}", release=False)
            return
        remote_ids = np.frombuffer(raw, dtype=np.int64)
        if len(remote_ids) != x.load.count:
            self._fail(p, x, f"producer {p.name} accepted {len(remote_ids)} blocks, not {x.load.count}")
            return
        starts, lens = paired_runs(remote_ids, x.local_ids)
        bb = self.block_bytes
        remote = _descs(int(p.remote["base"]), remote_ids, starts, lens, bb, int(p.remote["device"]))
        local = _descs(self.base, x.local_ids, starts, lens, bb, self.device)
        notif = json.dumps({"op": "done", "request_id": x.load.remote_request_id, "reader": self.conn.engine_id,
                            "xfer": x.id}).encode()
        with self._lock:
            if x.cancelled:
                self._send(p, self._release_msg(x))
                return
            try:
                x.handle = self.agent.initialize_xfer(
                    "READ", self.agent.get_xfer_descs(local, self.mem_type),
                    self.agent.get_xfer_descs(remote, p.remote["mem_type"]), p.agent, notif)
                state = self.agent.transfer(x.handle)
            except Exception as e:  # noqa: BLE001
                state, err = "ERR", e
            else:
                err = None
            x.posted_at = time.monotonic()
        p.reading[x.id] = x
        self.num_xfers += 1
        if state == "ERR":
            self._fail(p, x, f"NIXL READ from producer {p.name} could not start: {err or 'ERR'}")
        elif state == "DONE":
            self._finish(p, x)

    def _check_reads(self) -> None:
        now = time.monotonic()
        for key, p in list(self._peers.items()):
            for x in list(p.reading.values()):
                try:
                    state = self.agent.check_xfer_state(x.handle)
                except Exception as e:  # noqa: BLE001
                    state = f"ERR ({e})"
                if state == "DONE":
                    self._finish(p, x)
                elif state != "PROC":
                    self._fail_peer(key, p, f"NIXL READ from producer {p.name} failed: {state} (producer gone?)")
                    break
                elif now - x.posted_at > self.conn.recv_timeout_s:
                    self._fail_peer(key, p, f"NIXL READ from producer {p.name} unfinished after "
                                            f"{now - x.posted_at:.1f}s (producer unreachable or gone)")
                    break

    def _finish(self, p: _Peer, x: _Xfer) -> None:
        self._settle(x)
        with self._lock:
            live = self._live.get(x.load.request_id) is x
            if live:
                del self._live[x.load.request_id]
        p.last_heard = time.monotonic()
        if live and not x.cancelled:
            self.conn.count("bytes_received", int(x.load.count) * self.block_bytes)
            self.conn.count("transfers")
            self.conn.load_done(x.load.request_id)

    def _settle(self, x: _Xfer) -> None:
        """Release x's READ (cancelling it if it still runs); afterwards no byte can land."""
        for p in self._peers.values():
            if p.reading.pop(x.id, None) is not None:
                self.num_xfers -= 1
                break
        h = x.handle
        if h is not None and not getattr(h, "_released", True):
            try:
                h.release()  # cancels a running READ where the backend can
            except Exception:  # noqa: BLE001 - it could not cancel: wait for the READ to end
                deadline = time.monotonic() + self.conn.recv_timeout_s
                while time.monotonic() < deadline and self.agent.check_xfer_state(h) == "PROC":
                    time.sleep(0.001)
                try:
                    h.release()
                except Exception as e:  # noqa: BLE001
                    logger.error("NIXL READ handle could not be released: %s", e)
        x.settled.set()

    def _release_msg(self, x: _Xfer) -> dict[str, Any]:
        return {"op": "release", "request_id": x.load.remote_request_id, "reader": self.conn.engine_id,
                "xfer": x.id}

    def _fail(self, p: _Peer, x: _Xfer, why: str, release: bool = True) -> None:
        """One load fails on a producer that is still there. ``release=False``: it refused the
        read, so it holds nothing for us; either way finishing the request owes it no word."""
        self._settle(x)
        p.asked.pop(x.id, None)
        if release:
            try:
                self._send(p, self._release_msg(x))
            except zmq.ZMQError:
                pass
        with self._lock:
            if self._live.get(x.load.request_id) is x:
                del self._live[x.load.request_id]
        if not x.cancelled:
            self.conn.load_failed(x.load.request_id, why, released=True)

    def _fail_peer(self, key: tuple[str, int], p: _Peer, why: str) -> None:
        """Every load on a broken producer fails. Its READs are settled, its remote agent and
        socket dropped (a fresh handshake comes with the next load) before any failure is
        reported, so whoever sees the failure finds nothing of the peer left."""
        doomed = list(p.waiting) + list(p.asked.values()) + list(p.reading.values())
        p.waiting.clear()
        p.asked.clear()
        for x in doomed:
            self._settle(x)
            try:  # a producer that is merely slow frees the blocks now, not at lease end
                p.sock.send(json.dumps(self._release_msg(x)).encode(), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._close_peer(key, linger=200)  # long enough for the releases, short for a dead peer
        for x in doomed:
            with self._lock:
                if self._live.get(x.load.request_id) is x:
                    del self._live[x.load.request_id]
            if not x.cancelled:
                self.conn.load_failed(x.load.request_id, why, released=True)

    def _check_peers(self) -> None:
        now = time.monotonic()
        for key, p in list(self._peers.items()):
            silent = now - max(p.last_heard, p.asked_since)
            unanswered = p.asked or (p.hello_sent and p.agent is None and p.waiting)
            if unanswered and silent > self.conn.recv_timeout_s:
                self._fail_peer(key, p, f"producer {p.name} sent nothing for {silent:.1f}s "
                                        f"(unreachable, or died mid-transfer)")
            elif not p.busy and now - p.last_heard > self.conn.peer_idle_s:
                self._close_peer(key, linger=500)

    def _close_peer(self, key: tuple[str, int], linger: int) -> None:
        p = self._peers.pop(key)
        for x in list(p.reading.values()):
            self._settle(x)
        if p.agent is not None and self.agent is not None:
            try:
                self.agent.remove_remote_agent(p.agent)
            except Exception as e:  # noqa: BLE001
                logger.warning("NIXL remove_remote_agent(%s) failed: %s", p.agent, e)
        p.sock.close(linger=linger)
        self.num_peers = len(self._peers)
        self.num_agents = sum(q.agent is not None for q in self._peers.values())
