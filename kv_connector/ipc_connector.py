"""KV hand-off between two engines on one machine: CUDA IPC between GPUs, shared memory otherwise.

UCX and NIXL reach a peer's memory on the same machine, but not at the machine's speed: a NIXL
READ over UCX's ``cuda_ipc`` moved 139-164 GB/s between two processes on one H200, where a plain
copy out of the same CUDA IPC mapping runs at ~2 TB/s (``bench/ipc_copy.py``), and a peer's pinned
host memory reached a GPU only over TCP (< 1 GB/s; docs/BENCHMARKS.md). This connector keeps the
``zmq`` connector's control plane (same sockets, hold table, time-outs) and moves the bytes itself.
Where the producer's memory maps here the consumer reads it **one-sided** (``ipc_direct``): the
params carry the memory and a hold word, the copy starts in ``start_load_kv`` with no message
before it, and ``done`` follows it. Otherwise (``direct_read: false``, a full hold board, memory
that does not map) it asks first, as below:

- **cuda_ipc** (both caches on GPUs, two processes): the producer exports its cache once
  (``cuda_ipc.export``); the consumer maps it, copies the blocks (``copy_rows``), says ``done``.
- **host_ipc** (the producer's cache in host memory, which this connector then allocates in shared
  memory, ``allocate_kv_cache``): the consumer maps it, pinned, and copies the blocks out (one DMA
  a run into a GPU), then says ``done``.
- **ring** (otherwise: CUDA IPC unavailable, a consumer in host memory reading a GPU cache, or
  ``share_host_cache: false``): the consumer owns a shared,
  pinned ring of ``ring_slots`` × ``ring_slot_bytes`` (``shm_segment``); it asks the producer to
  fill a slot with a chunk of blocks (a D2H copy for a GPU cache), copies the filled slot into its
  cache (an H2D copy) and hands the slot back. Both sides queue their copies on a CUDA stream and
  report each by event, so with a load split over every slot D2H and H2D run back to back; once a
  ring is attached, a load's fills follow its read without waiting for the accept.

Wire (zmq; JSON, nothing pickled; "read"/"done"/"release" as in ``zmq_connector``):

    consumer DEALER                                          producer ROUTER
    {"op": "read", ..., "host", "ipc": bool}          ──▶   layout, host and hold checks
                                ◀── {"op": "accept", "xfer", "layout", "mode": "cuda_ipc",
                                     "ipc": export, "block_ids", "pinned_until"}   (copy, done)
                                ◀── {"op": "accept", ..., "mode": "host_ipc", "segment": {"name",
                                     "nbytes"}, "block_ids", "pinned_until"}       (copy, done)
                                ◀── {"op": "accept", "xfer", "layout", "mode": "ring"}
    {"op": "attach", "name", "nbytes"}  (once a ring)  ──▶   map the consumer's ring
                                ◀── {"op": "attached"} | {"op": "attach_failed", "msg"}
    {"op": "fill", "xfer", "request_id", "first", "n", "slot", "offset"} ──▶ copy blocks into slot
                                ◀── {"op": "filled", "xfer", "slot"} | {"op": "error", "xfer", "msg"}
    {"op": "detach"}  (closing the peer)               ──▶   unmap the ring

A reader of the producer's memory (CUDA IPC or host) holds its blocks by lease: the producer keeps them allocated until
``pinned_until`` (``time.monotonic()`` is one clock for the whole machine) unless ``done`` or
``release`` comes first, and the consumer counts a copy that ended after it as failed. A ring
fill pins its blocks only while the producer copies them. Whichever side dies, nothing stays in
/dev/shm (the producer unlinks the ring's name as it maps it).

Extra config: as ``zmq`` (``lease_s``, ``max_held_fraction``, ``recv_timeout_s``, ``peer_idle_s``, ``advertise_host``),
plus ``direct_read`` (true), ``board_slots`` (65536), ``cuda_ipc`` (true), ``share_host_cache`` (true),
``ring_slots`` (8), ``ring_slot_bytes`` (32 MiB); an in-place reader's pin lasts ``lease_s`` too. A ring takes ``ring_slots ×
ring_slot_bytes`` of /dev/shm per (consumer, producer) pair, reserved up front; a shared host cache
takes its own size, a hold board 16 bytes a slot (their names are unlinked at shutdown, or by the
next segment created on the machine if the producer was killed).
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from kv_connector import cuda_ipc
from kv_connector.base import KVConnectorRole, KVTransferConfig
from kv_connector.block_copy import copy_rows, gather_rows
from kv_connector.handoff import Load, layout_mismatch
from kv_connector.ipc_direct import DirectReader, HoldBoard
from kv_connector.shm_segment import ShmSegment
from kv_connector.zmq_connector import ZmqConnector, _Client, _Peer, _Server, _Xfer

logger = logging.getLogger(__name__)


def machine_id() -> str:
    """Equal for two processes exactly when they share a kernel (containers included)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _pack_ids(ids: list[int]) -> str:
    """Block ids for JSON: base64 of int64 (a 1 GB load of 16 KiB blocks names 65,536 of them)."""
    return base64.b64encode(np.asarray(ids, dtype=np.int64).tobytes()).decode()


def _unpack_ids(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=np.int64).copy()  # writable: torch wraps it


class IpcConnector(ZmqConnector):
    name = "ipc"

    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__(config)
        self.streams = 1  # its bytes never cross a socket: no striping
        self.use_cuda_ipc = bool(config.extra("cuda_ipc", True))
        # 8 x 32 MiB: the best ring tried through host memory on an H200 (docs/BENCHMARKS.md).
        self.ring_slots = max(1, int(config.extra("ring_slots", 8)))
        self.ring_slot_bytes = int(config.extra("ring_slot_bytes", 32 << 20))
        self.share_host_cache = bool(config.extra("share_host_cache", True))
        self.direct_read = bool(config.extra("direct_read", True))
        self.board_slots = max(1, int(config.extra("board_slots", 65536)))
        self.machine = machine_id()
        self._cache_seg: ShmSegment | None = None  # a host KV cache that consumers map
        self._board: HoldBoard | None = None  # producer: hold words for one-sided readers
        self._reader: DirectReader | None = None  # consumer: one-sided reads, scheduler thread

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor | None:
        """A producer's host cache goes in shared memory: consumers then copy straight out of it (one
        DMA a run into a GPU), with no copy into the ring on this side."""
        if device.type != "cpu" or self.role == KVConnectorRole.CONSUMER or not self.share_host_cache:
            return None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        try:
            self._cache_seg = ShmSegment.create(nbytes, pin=False)
        except OSError as e:
            logger.warning("host KV cache not shared (%s): consumers go through the ring", e)
            return None
        return self._cache_seg.buf.view(dtype).view(shape)

    def _shared_cache(self) -> dict[str, Any] | None:
        """The segment consumers map, when the registered cache is the one allocated there."""
        seg = self._cache_seg
        if seg is None or self._blocks is None or self._blocks.data_ptr() != seg.buf.data_ptr():
            return None
        return {"name": seg.name, "nbytes": seg.nbytes}

    def _start_transport(self) -> None:
        if self.on_gpu:  # made before any thread copies: the IO thread and one-sided reads share it
            self._copy_stream = torch.cuda.Stream(self._blocks.device)
        super()._start_transport()
        if self.direct_read and self.role != KVConnectorRole.CONSUMER and self._direct_source() is not None:
            try:
                self._board = HoldBoard(self.board_slots)
            except OSError as e:
                logger.warning("no hold board in /dev/shm (%s): consumers ask before each read", e)
        if self.direct_read and self.role != KVConnectorRole.PRODUCER:
            self._reader = DirectReader(self)

    def _direct_source(self) -> dict[str, Any] | None:
        """What a one-sided reader maps: the shared host cache, or the GPU cache over CUDA IPC."""
        shared = self._shared_cache()
        if shared is not None:
            return {"memory": "host", "segment": shared}
        export = self._server._export if self._server is not None else None
        return {"memory": "cuda", "export": export, "pid": os.getpid()} if export is not None else None

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        delay, params = super().request_finished(request, block_ids)
        source = self._direct_source() if params is not None and self._board is not None else None
        hold = self._board.hold(request.request_id) if source is not None else None
        if hold is not None:
            params["ipc"] = {"machine": self.machine, "layout": self.wire_layout, **source, **hold}
        return delay, params

    def get_finished(self) -> tuple[set[str], set[str], dict[str, str]]:
        if self._reader is not None:
            self._reader.poll()
        sent, recved, failed = super().get_finished()
        if self._board is not None:
            for rid in sent:  # before the scheduler has the blocks back: a reader sees the hold end first
                self._board.end(rid)
        return sent, recved, failed

    def _start_load(self, load: Load) -> None:
        if self._reader is None or not self._reader.start(load):
            super()._start_load(load)

    def _cancel_load(self, request_id: str) -> None:
        if self._reader is None or not self._reader.cancel(request_id):
            super()._cancel_load(request_id)

    def read_done(self, load: Load, nbytes: int) -> None:
        """A one-sided read ended within its hold: the load is in, the producer may free the blocks."""
        self.count("bytes_received", nbytes)
        self.count("transfers")
        self.load_done(load.request_id)
        self._client.send((load.remote_host, load.remote_port),
                          {"op": "done", "request_id": load.remote_request_id, "bytes": nbytes})

    def read_failed(self, load: Load, why: str) -> None:
        """A one-sided read that cannot be used: the producer is told to release at once."""
        self.load_failed(load.request_id, why, released=True)
        self._client.send((load.remote_host, load.remote_port), {"op": "release", "request_id": load.remote_request_id})

    def _stop_transport(self) -> None:
        super()._stop_transport()
        if self._reader is not None:
            self._reader.close()
        if self._board is not None:
            self._board.close()
        if self._cache_seg is not None:
            self._cache_seg.unlink()  # mapped until the engine lets go of its cache; the name goes now

    @property
    def on_gpu(self) -> bool:
        return self._blocks is not None and self._blocks.is_cuda

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        client, server = self._client, self._server
        s["xfers_in_flight"] = len(client._live) if client else 0
        s["rings"] = (len(client._rings) if client else 0) + (len(server._rings) if server else 0)
        reader = self._reader
        s["ipc_mappings"] = (len(client._maps) if client else 0) + (reader.num_mappings if reader is not None else 0)
        s["direct_reads_in_flight"] = len(reader) if reader is not None else 0
        return s


@dataclass(eq=False)
class _ReadPin:
    """Keeps a request's blocks allocated while a consumer reads them in place (CUDA IPC or the
    shared host cache): a HoldTable tracker, done at ``done``/``release`` or at ``until``."""

    until: float
    finished: bool = False

    @property
    def done(self) -> bool:
        return self.finished or time.monotonic() > self.until


class _IpcServer(_Server):
    """The producer: answers reads with a mode, fills ring slots, maps consumers' rings."""

    def __init__(self, conn: IpcConnector) -> None:
        super().__init__(conn)
        self._rings: dict[bytes, ShmSegment] = {}  # consumer identity -> its mapped ring
        # A consumer closes a connection idle for peer_idle_s (and says detach); a ring unused for
        # twice that belongs to a consumer that died, and is unmapped.
        self._ring_used: dict[bytes, float] = {}
        self._leases: dict[str, list[_ReadPin]] = {}
        self._export: dict[str, Any] | None = None
        self._stream: Any = None
        # GPU fills queued on _stream, oldest first: (done event, consumer, reply, request id). The
        # blocks stay pinned until the copy ends; replies go out in order as the events complete.
        self._filling: collections.deque = collections.deque()
        if conn.on_gpu and conn.use_cuda_ipc:
            try:
                self._export = cuda_ipc.export(conn._blocks)
            except (RuntimeError, OSError) as e:
                logger.warning("CUDA IPC unavailable for this KV cache (%s): the ipc connector uses its "
                               "shared-memory ring", e)

    def stop(self) -> None:
        super().stop()
        if self._stream is not None:
            self._stream.synchronize()
        while self._filling:
            self.conn.holds.unpin(self._filling.popleft()[3])
        for ident in list(self._rings):
            self._drop_ring(ident)

    def _poll_ms(self) -> int:
        return 0 if self._filling else super()._poll_ms()

    def _reply(self, ident: bytes, msg: dict[str, Any]) -> None:
        try:
            super()._reply(ident, msg)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the consumer died; its ring goes once unused, its holds expire
            logger.warning("consumer went away before a %s reached it: %s", msg.get("op"), e)

    def _after_poll(self) -> None:
        """Reply for every finished fill; with nothing else to do, wait for the oldest (GIL released)."""
        now = time.monotonic()
        for ident in [i for i, t in self._ring_used.items() if now - t > 2 * self.conn.peer_idle_s]:
            if not any(f[1] == ident for f in self._filling):
                self._drop_ring(ident)
        if self._filling and not self._filling[0][0].query() and not self.sock.poll(0):
            self._filling[0][0].synchronize()
        while self._filling and self._filling[0][0].query():
            _, ident, reply, rid = self._filling.popleft()
            self.conn.holds.unpin(rid)
            self._reply(ident, reply)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        ident, msg = frames[0], None
        try:
            msg = json.loads(frames[1])
            op = msg["op"]
            if op == "read":
                self._serve(ident, msg)
            elif op == "fill":
                self._fill(ident, msg)
            elif op == "attach":
                self._attach(ident, msg)
            elif op == "detach":
                self._drop_ring(ident)
            elif op in ("done", "release"):
                rid = str(msg["request_id"])
                self.conn.on_control(msg)
                self.conn.count("bytes_sent", int(msg.get("bytes", 0)))  # what a one-sided reader took
                for lease in self._leases.pop(rid, ()):
                    lease.finished = True
            else:
                self.conn.on_control(msg)  # renew
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("malformed message from a consumer ignored: %s", e)
        except Exception as e:  # noqa: BLE001  (a CUDA or OS error must not end the server thread)
            logger.exception("ipc producer failed to serve %s", frames[1][:200])
            if isinstance(msg, dict) and "xfer" in msg:
                self._reply(ident, {"op": "error", "xfer": msg["xfer"], **({"slot": msg["slot"]} if "slot" in msg
                                                                            else {}), "msg": f"producer: {e}"})
        self._leases = {rid: ls for rid, ls in self._leases.items() if not all(x.done for x in ls)}

    def _serve(self, ident: bytes, msg: dict[str, Any]) -> None:
        xfer, rid = int(msg["xfer"]), str(msg["request_id"])
        why = layout_mismatch(self.conn.wire_layout, msg.get("layout", {}), "the consumer")
        if why is None and msg.get("host") != self.conn.machine:
            why = "the ipc connector moves KV between engines on one machine; this producer is on another"
        ids = self.conn.holds.pin(rid, int(msg["first"]), int(msg["count"])) if why is None else why
        if isinstance(ids, str):
            self._reply(ident, {"op": "error", "xfer": xfer, "msg": ids, "layout": self.conn.wire_layout})
            return
        reply = {"op": "accept", "xfer": xfer, "layout": self.conn.wire_layout, "mode": "ring"}
        trackers = []
        shared = self.conn._shared_cache() if msg.get("map", True) else None
        if shared is not None:
            reply.update(mode="host_ipc", segment=shared)
        elif msg.get("ipc") and self._export is not None and msg.get("pid") != os.getpid():  # no IPC to oneself
            reply.update(mode="cuda_ipc", ipc=self._export)
        if reply["mode"] != "ring":  # the consumer copies out of our memory: the blocks stay by lease
            lease = _ReadPin(time.monotonic() + self.conn.lease_s)
            self._leases.setdefault(rid, []).append(lease)
            trackers.append(lease)
            reply.update(block_ids=_pack_ids(ids), pinned_until=lease.until)
            self.conn.count("bytes_sent", len(ids) * self.conn.wire_layout["block_bytes"])
        self.conn.holds.unpin(rid, trackers)
        self._reply(ident, reply)

    def _drop_ring(self, ident: bytes) -> None:
        self._ring_used.pop(ident, None)
        ring = self._rings.pop(ident, None)
        if ring is not None:
            if self._stream is not None:
                self._stream.synchronize()
            ring.close()

    def _attach(self, ident: bytes, msg: dict[str, Any]) -> None:
        self._drop_ring(ident)
        try:
            # Nobody opens it after us: its name goes now, so a consumer killed from here on leaves nothing.
            self._rings[ident] = ShmSegment.open(str(msg["name"]), int(msg["nbytes"]), pin=self.conn.on_gpu,
                                                 take_name=True)
            self._ring_used[ident] = time.monotonic()
        except (OSError, ValueError, RuntimeError) as e:
            self._reply(ident, {"op": "attach_failed", "msg": (
                f"producer could not map the consumer's shared ring {msg['name']!r}: {e} (both engines need "
                "one /dev/shm: same machine, same IPC namespace, e.g. docker `ipc: host`)")})
            return
        self._reply(ident, {"op": "attached"})

    def _fill(self, ident: bytes, msg: dict[str, Any]) -> None:
        xfer, rid, n = int(msg["xfer"]), str(msg["request_id"]), int(msg["n"])
        ring = self._rings.get(ident)
        if ring is not None:
            self._ring_used[ident] = time.monotonic()
        bb = self.conn.wire_layout["block_bytes"]
        offset = int(msg["offset"])
        ids = self.conn.holds.pin(rid, int(msg["first"]), n)
        if isinstance(ids, str) or ring is None or offset < 0 or offset + n * bb > ring.nbytes:
            why = ids if isinstance(ids, str) else "no ring attached, or a fill outside it"
            if not isinstance(ids, str):
                self.conn.holds.unpin(rid)
            self._reply(ident, {"op": "error", "xfer": xfer, "slot": int(msg["slot"]), "msg": why})
            return
        reply = {"op": "filled", "xfer": xfer, "slot": int(msg["slot"])}
        dst, blocks = ring.buf[offset:offset + n * bb].view(n, bb), self.conn._blocks
        if not blocks.is_cuda:
            try:
                gather_rows(dst, blocks, ids)
            finally:
                self.conn.holds.unpin(rid)
            self.conn.count("bytes_sent", n * bb)
            self._reply(ident, reply)
            return
        try:  # queued behind the fills before it: the copy engine never waits for a round trip
            if self._stream is None:
                self._stream = torch.cuda.Stream(blocks.device)
            with torch.cuda.stream(self._stream):
                gather_rows(dst, blocks, ids)
                done = torch.cuda.Event()
                done.record()
        except BaseException:
            self.conn.holds.unpin(rid)
            raise
        self._filling.append((done, ident, reply, rid))
        self.conn.count("bytes_sent", n * bb)


@dataclass
class _PeerRing:
    """A consumer's ring for one producer, and the chunks waiting for its slots."""

    seg: ShmSegment
    slot_bytes: int
    attached: bool = False
    free: list[int] = field(default_factory=list)
    inflight: dict[int, tuple[_Xfer, int, int]] = field(default_factory=dict)  # slot -> (xfer, pos, n)
    waiting: collections.deque = field(default_factory=collections.deque)  # (xfer, pos, n)


class _IpcClient(_Client):
    """The consumer: copies out of the producer's mapped memory, or drives it through a ring."""

    def __init__(self, conn: IpcConnector) -> None:
        super().__init__(conn)
        self._rings: dict[tuple[str, int], _PeerRing] = {}  # IO thread only
        self._maps: dict[tuple[str, int], tuple[dict, Any]] = {}  # (export, Mapping or ShmSegment)
        self._no_ipc: set[tuple[str, int]] = set()  # producers whose memory did not map here
        self._ring_only: set[tuple[str, int]] = set()  # producers that answered with the ring
        # H2D drains queued on the copy stream, oldest first: (done event, peer key, slot, xfer, n).
        # A slot goes back to the producer, and a load is done, only once its copies have ended.
        self._draining: collections.deque = collections.deque()
        self._on_ring: weakref.WeakSet[_Xfer] = weakref.WeakSet()  # transfers whose chunks are queued

    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)  # no drain is queued for it from here on...
        if self.conn._copy_stream is not None:
            self.conn._copy_stream.synchronize()  # ...and the queued ones have landed: abort may return

    def _poll_ms(self) -> int:
        return 0 if self._draining else super()._poll_ms()

    def _after_poll(self) -> None:
        if self._draining and not self._draining[0][0].query() and not self._any_ready():
            self._draining[0][0].synchronize()
        while self._draining and self._draining[0][0].query():
            _, key, slot, x, n = self._draining.popleft()
            self._drained(key, slot, x, n)

    def _any_ready(self) -> bool:
        return bool(self._wake_rx.poll(0)) or any(p.sock.poll(0) for p in self._peers.values())

    def _wants_ipc(self, key: tuple[str, int]) -> bool:
        return self.conn.on_gpu and self.conn.use_cuda_ipc and key not in self._no_ipc

    def _read_message(self, x: _Xfer) -> dict[str, Any]:
        key = (x.load.remote_host, x.load.remote_port)
        return {**super()._read_message(x), "host": self.conn.machine, "ipc": self._wants_ipc(key),
                "map": key not in self._no_ipc, "pid": os.getpid()}

    def _after_read(self, p: _Peer, x: _Xfer) -> None:
        """With a ring already attached, the fills follow the read at once: the producer takes them
        in order, and refuses them, each with its slot, if it refuses the read."""
        key = self._key(p)
        ring = self._rings.get(key)
        if ring is not None and ring.attached and key in self._ring_only:
            self._start_ring(p, x)

    def _key(self, p: _Peer) -> tuple[str, int]:
        return next(k for k, v in self._peers.items() if v is p)

    def _on_control(self, p: _Peer, msg: dict[str, Any]) -> None:
        try:
            self._dispatch(p, msg)
        except Exception as e:  # noqa: BLE001  (a CUDA or OS error fails the load, not the IO thread)
            logger.exception("ipc consumer failed on %s from %s", msg.get("op"), p.name)
            x = p.xfers.get(int(msg.get("xfer", -1)))
            if x is not None:
                self._fail(p, x, f"{type(e).__name__}: {e}")

    def _dispatch(self, p: _Peer, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "attached":
            ring = self._rings.get(self._key(p))
            if ring is not None:
                ring.attached = True
                ring.seg.linked = False  # the producer took the name (unlinked it) when it mapped the ring
                self._pump(p, ring)
            return
        if op == "attach_failed":
            ring = self._rings.pop(self._key(p), None)
            for x, _, _ in ring.waiting if ring else ():
                if x.id in p.xfers:
                    self._fail(p, x, str(msg.get("msg")))
            if ring is not None:
                ring.seg.close()
            return
        x = p.xfers.get(int(msg.get("xfer", -1)))
        if op == "filled" or op == "error" and "slot" in msg:
            self._on_filled(p, int(msg["slot"]), x, error=msg.get("msg") if op == "error" else None)
            return
        if x is None:
            return
        if op == "error" or "layout" in msg and layout_mismatch(self.conn.wire_layout, msg["layout"], p.name):
            super()._on_control(p, msg)
            return
        if op != "accept" or x in self._on_ring:  # its fills went out with the read
            return
        if msg.get("mode") in ("cuda_ipc", "host_ipc") and self._copy_ipc(p, x, msg):
            return
        if msg.get("mode") == "ring":
            self._ring_only.add(self._key(p))
        self._start_ring(p, x)

    def _copy_ipc(self, p: _Peer, x: _Xfer, msg: dict[str, Any]) -> bool:
        """Copy the blocks straight out of the producer's memory, mapped here: its GPU cache over
        CUDA IPC, or its host cache in shared memory. False when that memory does not map here: the
        caller falls back to the ring."""
        key = self._key(p)
        export = msg["ipc"] if msg["mode"] == "cuda_ipc" else msg["segment"]
        export_now, m = self._maps.get(key, (None, None))
        if m is None or export_now != export:
            try:
                if m is not None:
                    m.close()
                self._maps.pop(key, None)
                m = (cuda_ipc.Mapping(export, self.conn._blocks.device) if msg["mode"] == "cuda_ipc" else
                     ShmSegment.open(export["name"], int(export["nbytes"]), pin=self.conn.on_gpu))
                self._maps[key] = (export, m)
            except (RuntimeError, OSError, ValueError) as e:
                self._no_ipc.add(key)
                logger.info("%s memory of %s does not map here (%s): using the shared ring", msg["mode"], p.name, e)
                return False
        bb = self.conn.wire_layout["block_bytes"]
        with self._write_lock:
            if x.cancelled:
                del p.xfers[x.id]
                return True
            src, remote_ids = m.buf.view(-1, bb), _unpack_ids(msg["block_ids"])
            if self.conn.on_gpu:
                stream = self.conn._copy_stream or torch.cuda.Stream(self.conn._blocks.device)
                self.conn._copy_stream = stream
                with torch.cuda.stream(stream):
                    copy_rows(self.conn._blocks, x.local_ids, src, remote_ids)
                stream.synchronize()
            else:
                copy_rows(self.conn._blocks, x.local_ids, src, remote_ids)
        if time.monotonic() >= float(msg["pinned_until"]):
            self._fail(p, x, f"the copy from producer {p.name} outlasted its lease; the blocks may have "
                             "been reused meanwhile")
            return True
        self._finish(p, x, x.load.count * bb)
        return True

    def _finish(self, p: _Peer, x: _Xfer, nbytes: int) -> None:
        x.got = x.load.count
        del p.xfers[x.id]
        p.sock.send(json.dumps({"op": "done", "request_id": x.load.remote_request_id}).encode())
        self._forget(x)
        self.conn.count("bytes_received", nbytes)
        self.conn.count("transfers")
        self.conn.load_done(x.load.request_id)

    def _start_ring(self, p: _Peer, x: _Xfer) -> None:
        key = self._key(p)
        ring = self._rings.get(key)
        bb = self.conn.wire_layout["block_bytes"]
        if ring is None:
            slot_bytes = max(bb, self.conn.ring_slot_bytes // bb * bb)
            try:
                seg = ShmSegment.create(self.conn.ring_slots * slot_bytes, pin=self.conn.on_gpu)
            except (OSError, RuntimeError) as e:
                self._fail(p, x, f"could not create a {self.conn.ring_slots * slot_bytes >> 20} MiB shared ring "
                                 f"in /dev/shm: {e} (docker: shm_size or ipc: host; or lower ring_slot_bytes)")
                return
            ring = self._rings[key] = _PeerRing(seg, slot_bytes, free=list(range(self.conn.ring_slots)))
            p.sock.send(json.dumps({"op": "attach", "name": seg.name, "nbytes": seg.nbytes}).encode())
        self._on_ring.add(x)
        # At least one chunk per slot, so that even a small load keeps both copy directions busy.
        per_slot = min(ring.slot_bytes // bb, max(1, -(-x.load.count // self.conn.ring_slots)))
        ring.waiting.extend((x, pos, min(per_slot, x.load.count - pos)) for pos in range(0, x.load.count, per_slot))
        self._pump(p, ring)

    def _pump(self, p: _Peer, ring: _PeerRing) -> None:
        while ring.attached and ring.free and ring.waiting:
            x, pos, n = ring.waiting.popleft()
            if x.id not in p.xfers or x.cancelled:
                continue
            slot = ring.free.pop()
            ring.inflight[slot] = (x, pos, n)
            p.sock.send(json.dumps({"op": "fill", "xfer": x.id, "request_id": x.load.remote_request_id,
                                    "first": x.load.first + pos, "n": n, "slot": slot,
                                    "offset": slot * ring.slot_bytes}).encode())

    def _on_filled(self, p: _Peer, slot: int, x: _Xfer | None, error: str | None) -> None:
        key = self._key(p)
        ring = self._rings.get(key)
        if ring is None or slot not in ring.inflight:
            return
        sx, pos, n = ring.inflight.pop(slot)
        bb = self.conn.wire_layout["block_bytes"]
        live = x is sx and x.id in p.xfers
        if error is not None and live:
            self._fail(p, x, f"producer {p.name} refused a fill: {error}")
        elif live:
            with self._write_lock:
                if x.cancelled:
                    del p.xfers[x.id]
                else:
                    src = ring.seg.buf[slot * ring.slot_bytes:slot * ring.slot_bytes + n * bb].view(n, bb)
                    if self.conn.on_gpu:  # queued: the next slot's copy starts while this one runs
                        try:
                            self.conn.write_blocks(x.local_ids[pos:pos + n], src, wait=False)
                            done = torch.cuda.Event()
                            done.record(self.conn._copy_stream)
                        except BaseException:
                            ring.free.append(slot)
                            raise
                        self._draining.append((done, key, slot, x, n))
                        return
                    self.conn.write_blocks(x.local_ids[pos:pos + n], src.numpy())
        self._drained(key, slot, x if live else None, n)

    def _drained(self, key: tuple[str, int], slot: int, x: _Xfer | None, n: int) -> None:
        """Slot ``slot`` is free again; ``n`` more blocks of ``x`` (if still live) are in place."""
        ring, p = self._rings.get(key), self._peers.get(key)
        if ring is None or p is None:
            return
        ring.free.append(slot)
        if x is not None and x.id in p.xfers and not x.cancelled:
            x.got += n
            if x.got == x.load.count:
                self._finish(p, x, x.load.count * self.conn.wire_layout["block_bytes"])
        self._pump(p, ring)

    def _close_peer(self, key: tuple[str, int], linger: int) -> None:
        self._draining = collections.deque(d for d in self._draining if d[1] != key)  # synced below
        ring, (_, m) = self._rings.pop(key, None), self._maps.pop(key, (None, None))
        if ring is not None and linger > 0 and key in self._peers:
            self._peers[key].sock.send(json.dumps({"op": "detach"}).encode())
        super()._close_peer(key, linger)
        if self.conn._copy_stream is not None:
            self.conn._copy_stream.synchronize()
        if ring is not None:
            ring.seg.close()
        if m is not None:
            m.close()


IpcConnector.server_class = _IpcServer
IpcConnector.client_class = _IpcClient
