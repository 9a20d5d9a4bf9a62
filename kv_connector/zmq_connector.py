"""KV hand-off over ZeroMQ on TCP: the producer serves held blocks, the consumer pulls them.

Wire (JSON for the small control messages, raw bytes for blocks, nothing pickled):

    consumer DEALER                                        producer ROUTER (kv_ip:kv_port)
    {"op": "read", "xfer", "request_id", "first",   ──▶    check layout, pin the held blocks
     "count", "layout"}
                                                     ◀──   {"op": "accept", "xfer", "layout"}
                                                           or {"op": "error", "xfer", "msg"}
    write each frame into kv_cache[local ids]        ◀──   [HDR(xfer, pos, n), n blocks' raw bytes]
                                                           × one per run of consecutive block ids
    {"op": "done", "request_id"}                     ──▶   release → finished_sending (blocks freed)
    {"op": "release", "request_id"}  (on abort)      ──▶   same, at once
    {"op": "renew", "request_ids"}  (every lease_s/3) ──▶   extend the leases (kv_connector/lease.py)

The layout handshake rides in ``read``/``accept``: the producer refuses a read whose layout
differs (and the consumer double-checks ``accept``), so a mismatch costs no extra round trip and
fails only that request. Block-major caches make consecutive block ids consecutive bytes, so a
run of up to ``max_frame_bytes`` goes out as one zero-copy frame; a tracker on each frame keeps
the producer's blocks allocated until ZeroMQ has finished reading them.

Threads: the producer's server thread owns the ROUTER and only reads blocks the ``LeaseTable``
has pinned. The consumer's IO thread owns one DEALER per producer, multiplexes transfers on it
by ``xfer`` id, and fails every transfer on a producer that has sent nothing for
``recv_timeout_s`` (unreachable, or died mid-transfer), closing that socket. Frame writes take a
lock that ``abort`` also takes, so no byte lands in an aborted request's blocks afterwards.

Extra config: ``lease_s`` (30), ``max_held_fraction`` (0.5), ``recv_timeout_s`` (10), ``max_frame_bytes`` (16 MiB),
``frames_in_flight`` (4: a device cache's frames staged through pinned memory at once, zmq_staging.py),
``streams`` (1: a load of 2+ frames a stream is striped over this many TCP connections),
``peer_idle_s`` (30: an idle producer socket is closed), ``advertise_host``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from kv_connector.base import KVConnectorRole, KVTransferConfig
from kv_connector.handoff import HandoffConnector, Load, layout_mismatch
from kv_connector.zmq_staging import RecvStaging, SendStaging

logger = logging.getLogger(__name__)

_HDR = struct.Struct("<QII")  # xfer id, position of the first block in the load, number of blocks
_POLL_MS = 50  # how soon a server thread notices shutdown


def _runs(block_ids: list[int], max_blocks: int) -> list[tuple[int, int, int]]:
    """(position, first block id, count) for each run of consecutive ids, at most max_blocks long."""
    ids = np.asarray(block_ids, dtype=np.int64)
    starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)
    ends = np.append(starts[1:], len(ids))
    return [(p, int(ids[p]), min(max_blocks, e - p)) for s, e in zip(starts, ends)
            for p in range(s, e, max_blocks)]


class ZmqConnector(HandoffConnector):
    name = "zmq"
    server_class: type[_Server]  # set below the classes; a subclass swaps in its own
    client_class: type[_Client]

    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__(config)
        self.recv_timeout_s = float(config.extra("recv_timeout_s", 10.0))
        self.max_frame_bytes = int(config.extra("max_frame_bytes", 16 << 20))
        self.frames_in_flight = int(config.extra("frames_in_flight", 4))  # device caches: staged frames
        self.peer_idle_s = float(config.extra("peer_idle_s", 30.0))
        # A large load is striped over this many TCP connections, each on its own ZeroMQ IO thread.
        self.streams = max(1, int(config.extra("streams", 1)))
        self._ctx = zmq.Context(io_threads=self.streams)  # our own: shutdown proves every socket is closed
        self._server: _Server | None = None
        self._client: _Client | None = None

    def _start_transport(self) -> None:
        if self.role != KVConnectorRole.CONSUMER:
            self._server = self.server_class(self)
            self._server.start()
        if self.role != KVConnectorRole.PRODUCER:
            self._client = self.client_class(self)
            self._client.start()

    def _endpoint(self) -> tuple[str, int]:
        host = self.config.extra("advertise_host", None) or self.config.kv_ip
        if host in ("0.0.0.0", "*", ""):
            host = socket.gethostbyname(socket.gethostname())
        return host, self._server.port

    def _start_load(self, load: Load) -> None:
        self._client.submit(load)

    def _cancel_load(self, request_id: str) -> None:
        self._client.cancel(request_id)

    def _send_control(self, params: dict[str, Any], msg: dict[str, Any]) -> None:
        if self._client is not None:
            self._client.send((params["remote_host"], int(params["remote_port"])), msg)

    def _stop_transport(self) -> None:
        for t in (self._client, self._server):
            if t is not None:
                t.stop()
        self._ctx.term()  # returns only when every socket is closed: the proof nothing dangles

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["open_peer_sockets"] = self._client.num_peers if self._client else 0
        return s


class _Server(threading.Thread):
    """The producer's ROUTER: answers reads from the hold table, takes done/release."""

    def __init__(self, conn: ZmqConnector) -> None:
        super().__init__(name=f"kv-zmq-server-{conn.engine_id[:8]}", daemon=True)
        self.conn = conn
        self._stop_event = threading.Event()
        # Bound here so the port is known before the first request finishes; only run() uses it after.
        self.sock = conn._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished consumer raises, never blocks
        self.sock.setsockopt(zmq.SNDHWM, 0)  # frames reference held blocks: queueing costs no copy
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://{conn.config.kv_ip}:{conn.config.kv_port}")
        self.port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._max_blocks = max(1, conn.max_frame_bytes // conn.wire_layout["block_bytes"])
        self._staging: SendStaging | None = None  # made on the first read of a device cache

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def _poll_ms(self) -> int:
        return _POLL_MS

    def _after_poll(self) -> None:
        """Each turn of the loop, messages or not (a subclass finishes asynchronous work here)."""

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                ready = self.sock.poll(self._poll_ms())
                self._after_poll()
                if not ready:
                    continue
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames)
        finally:
            self.sock.close()

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        ident = frames[0]
        try:
            msg = json.loads(frames[1])
            op = msg["op"]
            if op == "read":
                self._serve(ident, msg)
            else:
                self.conn.on_control(msg)  # renew, done, release
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("malformed message from a consumer ignored: %s", e)

    def _reply(self, ident: bytes, msg: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, json.dumps(msg).encode()])

    def _serve(self, ident: bytes, msg: dict[str, Any]) -> None:
        xfer, rid = int(msg["xfer"]), str(msg["request_id"])
        why = layout_mismatch(self.conn.wire_layout, msg.get("layout", {}), "the consumer")
        block_ids = self.conn.holds.pin(rid, int(msg["first"]), int(msg["count"])) if why is None else why
        try:
            if isinstance(block_ids, str):  # our layout goes back so the consumer words the error
                self._reply(ident, {"op": "error", "xfer": xfer, "msg": block_ids, "layout": self.conn.wire_layout})
                return
            trackers = []
            try:
                self._reply(ident, {"op": "accept", "xfer": xfer, "layout": self.conn.wire_layout})
                if self.conn._blocks_np is None:
                    self._send_staged(ident, xfer, block_ids)
                else:
                    for pos, first, n in _runs(block_ids, self._max_blocks):
                        trackers.append(self._send_run(ident, xfer, pos, first, n))
                        self.conn.count("bytes_sent", n * self.conn.wire_layout["block_bytes"])
            finally:
                if self._staging is not None:  # no staging copy reads the held blocks any more
                    self._staging.settle()
                self.conn.holds.unpin(rid, trackers)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the consumer left; its blocks expire or get released
            logger.warning("consumer of %s went away mid-send: %s", rid, e)

    def _send_run(self, ident: bytes, xfer: int, pos: int, first: int, n: int) -> zmq.MessageTracker:
        payload = self.conn._blocks_np[first:first + n]  # zero-copy view into the cache
        return self.sock.send_multipart([ident, _HDR.pack(xfer, pos, n), payload], copy=False, track=True)

    def _send_staged(self, ident: bytes, xfer: int, block_ids: list[int]) -> None:
        """A device cache: frames staged through pinned buffers, copies pipelined with sends."""
        if self._staging is None:
            self._staging = SendStaging(self.conn._blocks, self.conn.max_frame_bytes, self.conn.frames_in_flight)
        for pos, n, payload, buf in self._staging.frames(block_ids):
            tracker = self.sock.send_multipart([ident, _HDR.pack(xfer, pos, n), payload], copy=False, track=True)
            self._staging.sent(buf, tracker)
            self.conn.count("bytes_sent", n * self.conn.wire_layout["block_bytes"])


@dataclass(eq=False)
class _Stripes:
    """The parts of one load read over several connections: it is done when all are, failed once."""

    members: list[_Xfer] = field(default_factory=list)
    left: int = 0
    failed: bool = False


@dataclass(eq=False)
class _Xfer:
    id: int
    load: Load
    local_ids: np.ndarray
    got: int = 0
    cancelled: bool = False
    stripe: int = 0  # which connection to the producer reads it
    stripes: _Stripes | None = None

    @property
    def head(self) -> _Xfer:
        return self.stripes.members[0] if self.stripes is not None else self

    @property
    def progress(self) -> tuple[int, int]:
        """(blocks received, blocks asked for) of the whole load, every stripe counted."""
        members = self.stripes.members if self.stripes is not None else [self]
        return sum(x.got for x in members), sum(x.load.count for x in members)

    def fail_once(self) -> bool:
        """Whether this failure is the load's first (its other stripes are then cancelled)."""
        if self.stripes is None:
            return True
        if self.stripes.failed:
            return False
        self.stripes.failed = True
        for x in self.stripes.members:
            x.cancelled = x.cancelled or x is not self
        return True


class _Peer:
    def __init__(self, ctx: zmq.Context, host: str, port: int, stripe: int = 0) -> None:
        self.name = f"{host}:{port}"
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 500)  # let a last done/release leave before close
        self.sock.connect(f"tcp://{host}:{port}")
        self.xfers: dict[int, _Xfer] = {}
        self.last_heard = time.monotonic()


class _Client(threading.Thread):
    """The consumer's IO thread: one DEALER per producer, transfers multiplexed by xfer id."""

    def __init__(self, conn: ZmqConnector) -> None:
        super().__init__(name=f"kv-zmq-client-{conn.engine_id[:8]}", daemon=True)
        self.conn = conn
        self._stop_event = threading.Event()
        self._cmds: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._write_lock = threading.Lock()  # held while bytes land in the cache; abort takes it
        self._live: dict[str, _Xfer] = {}  # request_id -> its transfer, under _write_lock
        self._ids = itertools.count(1)
        self._peers: dict[tuple[str, int], _Peer] = {}  # IO thread only
        self.num_peers = 0
        addr = f"inproc://kv-zmq-wake-{id(self)}"
        self._wake_rx = conn._ctx.socket(zmq.PAIR)  # wakes the IO thread when commands arrive
        self._wake_rx.bind(addr)
        self._wake_tx = conn._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(addr)
        self._wake_lock = threading.Lock()
        self._staging = RecvStaging(conn.max_frame_bytes, conn.frames_in_flight)  # device caches only

    # ---- scheduler-thread API ----------------------------------------------------------------------

    def submit(self, load: Load) -> None:
        parts = self._split(load)
        xs = [_Xfer(next(self._ids), part, np.asarray(part.local_block_ids, dtype=np.int64), stripe=i)
              for i, part in enumerate(parts)]
        if len(xs) > 1:
            stripes = _Stripes(xs, len(xs))
            for x in xs:
                x.stripes = stripes
        with self._write_lock:
            self._live[load.request_id] = xs[0]
        for x in xs:
            self._command("load", x, None)

    def _split(self, load: Load) -> list[Load]:
        """The load in ``streams`` position ranges, when it is worth several frames per stream."""
        frames = load.count * self.conn.wire_layout["block_bytes"] // max(1, self.conn.max_frame_bytes)
        k = min(self.conn.streams, frames // 2)
        if k <= 1:
            return [load]
        bounds = [load.count * i // k for i in range(k + 1)]
        return [dataclasses.replace(load, local_block_ids=load.local_block_ids[a:b], first=load.first + a,
                                    count=b - a) for a, b in zip(bounds, bounds[1:])]

    def cancel(self, request_id: str) -> None:
        with self._write_lock:
            x = self._live.pop(request_id, None)
            for member in (x.stripes.members if x is not None and x.stripes else [x] if x else []):
                member.cancelled = True
            self._settle_uploads()  # uploads already queued land before abort returns, never after

    def _settle_uploads(self) -> None:
        """Device caches: wait for every queued upload (before a load is reported either way)."""
        if self.conn._copy_stream is not None:
            self.conn._copy_stream.synchronize()

    def send(self, peer: tuple[str, int], msg: dict[str, Any]) -> None:
        self._command("send", peer, msg)

    def stop(self) -> None:
        self._stop_event.set()
        self._command("stop", None, None)
        self.join()
        with self._wake_lock:
            self._wake_tx.close(linger=0)

    def _command(self, kind: str, a: Any, b: Any) -> None:
        self._cmds.put((kind, a, b))
        with self._wake_lock:
            if not self._wake_tx.closed:
                self._wake_tx.send(b"", zmq.NOBLOCK)

    # ---- IO thread ----------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                poller = zmq.Poller()
                poller.register(self._wake_rx, zmq.POLLIN)
                for p in self._peers.values():
                    poller.register(p.sock, zmq.POLLIN)
                ready = dict(poller.poll(self._poll_ms()))
                if self._wake_rx in ready:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                self._run_commands()
                for p in list(self._peers.values()):
                    if p.sock in ready:
                        self._drain(p)
                self._after_poll()
                self._check_peers()
        finally:
            for key in list(self._peers):
                self._close_peer(key, linger=0)
            self._wake_rx.close(linger=0)

    def _poll_ms(self) -> int:
        return int(min(_POLL_MS, self.conn.recv_timeout_s * 250))

    def _after_poll(self) -> None:
        """Each turn of the loop, messages or not (a subclass finishes asynchronous work here)."""

    def _peer(self, key: tuple[str, int]) -> _Peer:
        p = self._peers.get(key)
        if p is None:
            p = self._peers[key] = _Peer(self.conn._ctx, *key)
            self.num_peers = len(self._peers)
        return p

    def _close_peer(self, key: tuple[str, int], linger: int) -> None:
        self._peers.pop(key).sock.close(linger=linger)
        self.num_peers = len(self._peers)

    def _run_commands(self) -> None:
        while not self._cmds.empty():
            kind, a, b = self._cmds.get()
            if kind == "load" and not a.cancelled:
                load = a.load
                p = self._peer((load.remote_host, load.remote_port) + ((a.stripe,) if a.stripe else ()))
                if not p.xfers:
                    p.last_heard = time.monotonic()  # the silence clock starts with our first ask
                p.xfers[a.id] = a
                p.sock.send(json.dumps(self._read_message(a)).encode())
                self._after_read(p, a)
            elif kind == "send":
                self._peer(a).sock.send(json.dumps(b).encode())

    def _after_read(self, p: _Peer, x: _Xfer) -> None:
        """A read for ``x`` has just gone out (a subclass may start more without waiting for accept)."""

    def _read_message(self, x: _Xfer) -> dict[str, Any]:
        load = x.load
        return {"op": "read", "xfer": x.id, "request_id": load.remote_request_id, "first": load.first,
                "count": load.count, "layout": self.conn.wire_layout}

    def _drain(self, p: _Peer) -> None:
        while True:
            try:
                frames = p.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            p.last_heard = time.monotonic()
            if len(frames) == 1:
                self._on_control(p, json.loads(frames[0].bytes))
            elif len(frames) == 2:
                self._on_blocks(p, frames[0].bytes, frames[1].buffer)

    def _on_control(self, p: _Peer, msg: dict[str, Any]) -> None:
        x = p.xfers.get(int(msg.get("xfer", -1)))
        if x is None:
            return
        why = layout_mismatch(self.conn.wire_layout, msg.get("layout", {}), f"producer {p.name}")
        if why is not None:
            self._fail(p, x, why)
        elif msg.get("op") == "error":
            self._fail(p, x, f"producer {p.name} refused the read: {msg.get('msg')}")

    def _on_blocks(self, p: _Peer, header: bytes, payload: memoryview) -> None:
        xfer, pos, n = _HDR.unpack(header)
        x = p.xfers.get(xfer)
        if x is None:
            return  # a failed or aborted transfer's tail
        block_bytes = self.conn.wire_layout["block_bytes"]
        if len(payload) != n * block_bytes or pos + n > x.load.count:
            self._fail(p, x, f"producer {p.name} sent a malformed frame ({len(payload)} bytes at {pos})")
            return
        src = np.frombuffer(payload, dtype=np.uint8).reshape(n, block_bytes)
        with self._write_lock:
            if x.cancelled:
                del p.xfers[xfer]
                return
            if self.conn._blocks_np is not None:
                self.conn.write_blocks(x.local_ids[pos:pos + n], src)
            else:  # queued on the copy stream; the next frame is received meanwhile
                buf = self._staging.buffer(src.size)
                self.conn.write_blocks(x.local_ids[pos:pos + n], RecvStaging.stage(buf, src), wait=False)
                self._staging.uploaded(buf, self.conn._copy_stream)
        x.got += n
        self.conn.count("bytes_received", len(payload))
        if x.got == x.load.count:
            del p.xfers[xfer]
            if x.stripes is not None:
                x.stripes.left -= 1
                if x.stripes.left > 0:
                    return  # the load's other stripes are still coming
            self._settle_uploads()
            p.sock.send(json.dumps({"op": "done", "request_id": x.load.remote_request_id}).encode())
            self._forget(x)
            self.conn.count("transfers")
            self.conn.load_done(x.load.request_id)

    def _forget(self, x: _Xfer) -> None:
        with self._write_lock:
            if self._live.get(x.load.request_id) is x.head:
                del self._live[x.load.request_id]

    def _fail(self, p: _Peer, x: _Xfer, why: str) -> None:
        p.xfers.pop(x.id, None)
        self._settle_uploads()  # the engine frees the blocks once it hears: nothing may land after
        self._forget(x)
        if x.cancelled or not x.fail_once():
            return  # aborted, or another stripe of the load failed first and released
        self.conn.load_failed(x.load.request_id, why)
        p.sock.send(json.dumps({"op": "release", "request_id": x.load.remote_request_id}).encode())

    def _check_peers(self) -> None:
        now = time.monotonic()
        for key, p in list(self._peers.items()):
            if key not in self._peers:
                continue  # closed with a sibling stripe's connection below
            for x in [x for x in p.xfers.values() if x.cancelled]:
                del p.xfers[x.id]
            silent = now - p.last_heard
            if p.xfers and silent > self.conn.recv_timeout_s:
                # The producer is presumed dead: every connection to it (a striped load's too) is
                # closed before the failures are reported, so whoever sees one finds no socket to
                # the peer left; a fresh socket later means no stale frames, no retries. Reported
                # as released: a release would reopen a socket to a peer presumed dead, and a
                # merely slow producer frees its held blocks when their lease runs out.
                doomed = []
                for k in [k for k in self._peers if k[:2] == key[:2]]:
                    doomed += [x for x in self._peers[k].xfers.values() if not x.cancelled]
                    self._close_peer(k, linger=0)
                self._settle_uploads()
                for x in doomed:
                    self._forget(x)
                    if not x.fail_once():
                        continue
                    got, count = x.progress
                    self.conn.load_failed(x.load.request_id, (
                        f"producer {p.name} sent nothing for {silent:.1f}s (unreachable, or died "
                        f"mid-transfer): got {got} of {count} blocks"), released=True)
            elif not p.xfers and silent > self.conn.peer_idle_s:
                self._close_peer(key, linger=500)


ZmqConnector.server_class = _Server
ZmqConnector.client_class = _Client
