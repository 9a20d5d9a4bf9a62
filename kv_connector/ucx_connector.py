"""KV hand-off over UCX (the ``ucxx`` bindings): tagged sends of whole runs of blocks, received
straight into the consumer's cache; UCX active messages carry the small control messages.

Wire (active messages: ``[u32 json length][json][raw bytes]``, nothing pickled; data: tags):

    consumer endpoint                                       producer listener (kv_ip:kv_port)
    AM {"op": "read", "xfer", "request_id", "first",  ──▶   check layout, pin the held blocks
        "count", "layout"} + local run breaks (int64)
                                                      ◀──   AM {"op": "accept", "xfer", "layout"}
                                                            + producer run breaks (int64)
                                                            or AM {"op": "error", "xfer", "msg", "layout"}
    both sides cut the load at the union of the breaks: each run is consecutive on both sides
    post one tag receive per run into kv_cache[local]  ◀──   tag send per run, tag = xfer << 32 | run
    AM {"op": "done", "request_id"}                    ──▶  release → finished_sending
    AM {"op": "release", "request_id"} (on abort)      ──▶  same, at once

Runs are sent from, and received into, the caches themselves: zero copies on the host, and
GPU memory directly where UCX has CUDA transports (``cuda_ipc``/``cuda_copy``). A device cache
without them is staged through pinned host memory. The producer unpins a request's blocks with
one tracker per send, so expiry never frees blocks a send still reads.

Threads: one IO thread per connector posts every UCX operation and polls their completion; the
UCX worker's own progress thread moves the bytes. ``abort`` returns once the request's posted
receives have completed or their endpoint is closed, so no byte lands in its blocks afterwards;
a read accepted after its abort is drained into scratch memory so the producer's sends finish.
A producer that sends nothing for ``recv_timeout_s`` while a load waits on it, or whose
connection breaks (killed: UCX says so at once), fails every load on it; its endpoint is closed,
cancelling the posted receives, before the failures are reported, so whoever sees a failure finds
nothing of that peer left.

Extra config: ``lease_s`` (30), ``max_held_fraction`` (0.5), ``recv_timeout_s`` (10), ``peer_idle_s`` (30),
``advertise_host``, ``ucx_config`` (UCX settings without the ``UCX_`` prefix; default
``RNDV_SCHEME: put_zcopy``; ``UCX_*`` environment variables win), ``peer_error_handling`` (true;
false lets host-memory transfers on one machine use shared memory, and a dead producer is then
noticed by ``recv_timeout_s`` instead of at once; set it alike on both sides).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kv_connector.base import KVConnectorRole, KVTransferConfig
from kv_connector.handoff import HandoffConnector, Load, layout_mismatch

logger = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_IDLE_WAIT_S = 0.02
_BUSY_WAIT_S = 0.0002


# On the lent 2 x H200 machine (NVLink) UCX's default GET-based rendezvous over cuda_ipc never
# completed a GPU-to-GPU message, while the PUT-based one moved 47-141 GB/s (docs/BENCHMARKS.md).
_DEFAULT_UCX_CONFIG = {"RNDV_SCHEME": "put_zcopy"}


def ucx_context_config(extra: dict) -> dict[str, str]:
    """UCX settings for our context: our defaults, then ``ucx_config`` from the connector's extra
    config (names without the ``UCX_`` prefix); a ``UCX_*`` environment variable beats both."""
    merged = {**_DEFAULT_UCX_CONFIG, **{str(k).upper(): str(v) for k, v in extra.items()}}
    return {k: v for k, v in merged.items() if f"UCX_{k}" not in os.environ}


def ucx_api():
    """(libucxx, Array) from ``ucxx`` (PyPI ucxx-cu12 / ucxx-cu13: the import names are the same)."""
    try:
        # libucxx.so finds libucp.so.0 only if UCX is loaded already; ucxx loads it only when
        # librmm is installed too, which nothing here needs, so load the libucx wheel ourselves.
        import libucx

        libucx.load_library()
    except ImportError:
        pass  # a system UCX the dynamic loader finds
    try:
        import ucxx._lib.libucxx as ucx
        from ucxx._lib.arr import Array
    except ImportError as e:
        raise ImportError(f"UCX bindings are not installed (pip install 'kvfabric[transports]'): {e}") from e
    return ucx, Array


def _pack(msg: dict[str, Any], raw: bytes = b"") -> np.ndarray:
    body = json.dumps(msg).encode()
    return np.frombuffer(_LEN.pack(len(body)) + body + raw, dtype=np.uint8).copy()


def _unpack(buf: Any) -> tuple[dict[str, Any], bytes]:
    b = bytes(memoryview(buf).cast("B"))
    n = _LEN.unpack_from(b)[0]
    return json.loads(b[4:4 + n]), b[4 + n:]


def _breaks(ids: np.ndarray) -> np.ndarray:
    """Positions where a run of consecutive ids starts, 0 excluded."""
    return (np.flatnonzero(np.diff(ids) != 1) + 1).astype(np.int64)


def _runs(n: int, *breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.union1d(np.zeros(1, np.int64), np.concatenate(breaks)).astype(np.int64)
    return starts, np.diff(np.append(starts, n))


class UcxConnector(HandoffConnector):
    name = "ucx"

    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__(config)
        self._ucx, self._Array = ucx_api()
        self.recv_timeout_s = float(config.extra("recv_timeout_s", 10.0))
        self.peer_idle_s = float(config.extra("peer_idle_s", 30.0))
        self.ucx_config = ucx_context_config(config.extra("ucx_config", None) or {})
        # UCX admits only transports that report a dead peer when endpoints ask for that, which
        # rules out shared memory and CMA: host-memory transfers on one machine then go over TCP.
        # Off, they may take shared memory, and a dead producer is noticed by recv_timeout_s.
        self.peer_error_handling = bool(config.extra("peer_error_handling", True))
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

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        io = self._io
        s.update(open_peer_sockets=io.num_peers if io else 0, producer_endpoints=io.num_served if io else 0,
                 xfers_in_flight=io.num_xfers if io else 0, cuda_transports=bool(io and io.cuda_direct))
        return s


class _Sent:
    """A HoldTable tracker: the send of one run, done once UCX no longer reads the blocks."""

    def __init__(self, req: Any, buf: Any) -> None:
        self.req, self.buf = req, buf  # buf: kept alive while UCX reads it

    @property
    def done(self) -> bool:
        return self.req.completed


@dataclass(eq=False)
class _Xfer:
    id: int
    load: Load
    local_ids: np.ndarray
    recvs: list[Any] = field(default_factory=list)
    next: int = 0  # receives before this one have completed
    staged: torch.Tensor | None = None  # pinned host buffer when the cache is on a GPU without CUDA transports
    cancelled: bool = False
    settled: threading.Event = field(default_factory=threading.Event)


class _Ep:
    """One UCX endpoint with its always-posted active-message receive."""

    def __init__(self, ep: Any, name: str) -> None:
        self.ep, self.name = ep, name
        self.am = ep.am_recv()
        self.asked: dict[int, _Xfer] = {}  # consumer: reads waiting for accept/error
        self.receiving: dict[int, _Xfer] = {}  # consumer: receives posted
        self.last_heard = time.monotonic()

    @property
    def busy(self) -> bool:
        return bool(self.asked or self.receiving)


class _Io(threading.Thread):
    def __init__(self, conn: UcxConnector) -> None:
        super().__init__(name=f"kv-ucx-{conn.engine_id[:8]}", daemon=True)
        self.conn = conn
        ucx = conn._ucx
        self._stop_event = threading.Event()
        self._cmds: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _live, every _Xfer's recvs/cancelled
        self._live: dict[str, _Xfer] = {}
        self._ids = itertools.count(1)
        self._peers: dict[tuple[str, int], _Ep] = {}  # consumer side
        self._served: list[_Ep] = []  # producer side
        self._new_eps: list[Any] = []  # appended by the listener callback (UCX progress thread)
        self._owned: list[tuple[Any, Any]] = []  # (request, buffer it uses) until the request completes
        self.num_peers = self.num_served = self.num_xfers = 0  # num_xfers: loads with receives posted
        cache = conn.kv_cache
        self.on_gpu = cache.device.type == "cuda"
        self.ctx = ucx.UCXContext(config_dict=conn.ucx_config,
                                  feature_flags=(ucx.Feature.TAG, ucx.Feature.AM, ucx.Feature.WAKEUP))
        self.cuda_direct = self.on_gpu and bool(self.ctx.cuda_support)
        self.worker = ucx.UCXWorker(self.ctx)
        if self.on_gpu:
            from ucxx._cuda_context import ensure_cuda_context

            self.worker.set_progress_thread_start_callback(ensure_cuda_context, cb_args=(cache.device.index or 0,))
        self.worker.start_progress_thread(polling_mode=False)
        self.listener = None
        self.port = 0
        if conn.role != KVConnectorRole.CONSUMER:
            self.listener = ucx.UCXListener.create(self.worker, conn.config.kv_port, self._on_connect)
            self.port = int(self.listener.port)

    def _on_connect(self, conn_request: Any) -> None:
        self._new_eps.append(self.listener.create_endpoint_from_conn_request(conn_request,
                                                                             self.conn.peer_error_handling))

    # ---- scheduler-thread API -----------------------------------------------------------------------

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
            posted = bool(x.recvs)
        if posted and not x.settled.wait(self.conn.recv_timeout_s + 5):
            logger.error("UCX receives of %s did not settle after abort", request_id)

    def command(self, kind: str, a: Any, b: Any) -> None:
        self._cmds.put((kind, a, b))

    def stop(self) -> None:
        self._stop_event.set()
        self.command("stop", None, None)
        self.join()

    # ---- IO thread --------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                busy = any(p.busy for p in self._peers.values()) or self._served
                try:
                    cmd = self._cmds.get(timeout=_BUSY_WAIT_S if busy else _IDLE_WAIT_S)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    self._run_command(*cmd)
                    cmd = None if self._cmds.empty() else self._cmds.get()
                while self._new_eps:
                    self._served.append(_Ep(self._new_eps.pop(), "consumer"))
                    self.num_served = len(self._served)
                self._poll_served()
                for key, p in list(self._peers.items()):
                    self._poll_peer(key, p)
                self._check_peers()
                if self._owned:
                    self._owned = [(r, b) for r, b in self._owned if not r.completed]
        finally:
            self._close()

    def _close(self) -> None:
        for key in list(self._peers):
            self._close_peer(key)
        for e in self._served:
            self._close_ep(e.ep)
        self._served.clear()
        self.listener = None
        self.worker.stop_progress_thread()

    @staticmethod
    def _close_ep(ep: Any) -> None:
        try:
            ep.close_blocking()  # cancels the endpoint's outstanding requests
        except Exception as e:  # noqa: BLE001 - the peer may be gone already
            logger.debug("UCX endpoint close: %s", e)

    @staticmethod
    def _check_alive(ep: Any) -> None:
        # ucxx 0.52 blocks forever in am_send/tag_send on an endpoint whose peer has gone: ask first.
        if not ep.alive:
            raise ConnectionError("UCX endpoint is closed (peer gone)")

    def _send(self, ep: Any, msg: dict[str, Any], raw: bytes = b"") -> None:
        self._check_alive(ep)
        buf = _pack(msg, raw)
        self._keep(ep.am_send(self.conn._Array(buf)), buf)

    def _keep(self, req: Any, buf: Any) -> None:
        """UCX reads/writes ``buf`` until ``req`` completes, but the request does not own it."""
        self._owned.append((req, buf))

    def _buffer(self, blocks: torch.Tensor | np.ndarray) -> Any:
        return self.conn._Array(blocks)

    # ---- producer side ----------------------------------------------------------------------------------

    def _poll_served(self) -> None:
        for e in list(self._served):
            while e.am.completed:
                try:
                    e.am.check_error()
                    msg, raw = _unpack(e.am.recv_buffer)
                except Exception as err:  # noqa: BLE001 - the consumer left: its blocks expire or were released
                    logger.debug("consumer endpoint closed: %s", err)
                    self._served.remove(e)
                    self.num_served = len(self._served)
                    self._close_ep(e.ep)
                    break
                e.am = e.ep.am_recv()
                try:
                    self._serve(e, msg, raw)
                except (ValueError, KeyError, TypeError) as err:
                    logger.warning("malformed message from a consumer ignored: %s", err)
                except ConnectionError as err:  # its pins are undone; the hold expires or was released
                    logger.warning("consumer went away mid-send: %s", err)
                    break

    def _serve(self, e: _Ep, msg: dict[str, Any], raw: bytes) -> None:
        op = msg["op"]
        if self.conn.on_control(msg):  # renew, done, release
            return
        if op != "read":
            return
        xfer, rid = int(msg["xfer"]), str(msg["request_id"])
        layout = self.conn.wire_layout
        why = layout_mismatch(layout, msg.get("layout", {}), "the consumer")
        ids = self.conn.holds.pin(rid, int(msg["first"]), int(msg["count"])) if why is None else why
        if isinstance(ids, str):
            self._send(e.ep, {"op": "error", "xfer": xfer, "msg": ids, "layout": layout})
            return
        sends = []
        try:
            ids = np.asarray(ids, dtype=np.int64)
            mine = _breaks(ids)
            self._send(e.ep, {"op": "accept", "xfer": xfer, "layout": layout}, mine.tobytes())
            starts, lens = _runs(len(ids), mine, np.frombuffer(raw, dtype=np.int64))
            for i, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
                self._check_alive(e.ep)
                src = self._source(int(ids[s]), n)
                sends.append(_Sent(e.ep.tag_send(self._buffer(src), self.conn._ucx.UCXXTag((xfer << 32) | i)), src))
            self.conn.count("bytes_sent", len(ids) * layout["block_bytes"])
        finally:
            self.conn.holds.unpin(rid, sends)

    def _source(self, first: int, n: int) -> np.ndarray | torch.Tensor:
        if not self.on_gpu:
            return self.conn._blocks_np[first:first + n]
        blocks = self.conn._blocks[first:first + n]
        return blocks if self.cuda_direct else blocks.cpu().numpy()  # no CUDA transport: stage to host

    # ---- consumer side ----------------------------------------------------------------------------------

    def _peer(self, key: tuple[str, int]) -> _Ep:
        p = self._peers.get(key)
        if p is None:
            ep = self.conn._ucx.UCXEndpoint.create(self.worker, key[0], key[1], self.conn.peer_error_handling)
            p = self._peers[key] = _Ep(ep, f"{key[0]}:{key[1]}")
            self.num_peers = len(self._peers)
        return p

    def _run_command(self, kind: str, a: Any, b: Any) -> None:
        try:
            if kind == "load" and not a.cancelled:
                key = (a.load.remote_host, a.load.remote_port)
                p = self._peer(key)
                if not p.ep.alive:
                    self._fail_peer(key, p, f"producer {p.name} closed the connection")
                    self._fail(None, a, f"producer {p.name} closed the connection (gone, or not listening)")
                    return
                if not p.busy:
                    p.last_heard = time.monotonic()  # the silence clock starts with our first ask
                p.asked[a.id] = a
                self._send(p.ep, {"op": "read", "xfer": a.id, "request_id": a.load.remote_request_id,
                                  "first": a.load.first, "count": a.load.count, "layout": self.conn.wire_layout},
                           _breaks(a.local_ids).tobytes())
            elif kind == "send":
                self._send(self._peer(a).ep, b)
        except Exception as e:  # noqa: BLE001 - UCX raises its own types (unreachable host...)
            if kind == "load":
                self._fail(None, a, f"could not reach producer {a.load.remote_host}:{a.load.remote_port}: {e}")
            else:
                logger.warning("UCX control message to %s lost: %s", a, e)

    def _poll_peer(self, key: tuple[str, int], p: _Ep) -> None:
        while p.am.completed:
            try:
                p.am.check_error()
                msg, raw = _unpack(p.am.recv_buffer)
            except Exception as err:  # noqa: BLE001
                self._fail_peer(key, p, f"producer {p.name} closed the connection: {err}")
                return
            p.am = p.ep.am_recv()
            p.last_heard = time.monotonic()
            x = p.asked.pop(int(msg.get("xfer", -1)), None)
            if x is not None:
                try:
                    self._on_answer(p, x, msg, raw)
                except ConnectionError as err:
                    p.asked[x.id] = x
                    self._fail_peer(key, p, f"producer {p.name} closed the connection: {err}")
                    return
        for x in list(p.receiving.values()):
            try:
                while x.next < len(x.recvs) and x.recvs[x.next].completed:
                    x.recvs[x.next].check_error()
                    x.next += 1
                    p.last_heard = time.monotonic()
            except Exception as err:  # noqa: BLE001 - a broken connection: every load on it fails
                self._fail_peer(key, p, f"receive from producer {p.name} failed: {err}")
                return
            if x.next == len(x.recvs):
                self._finish(p, x)

    def _on_answer(self, p: _Ep, x: _Xfer, msg: dict[str, Any], raw: bytes) -> None:
        why = layout_mismatch(self.conn.wire_layout, msg.get("layout", {}), f"producer {p.name}")
        if why is None and msg.get("op") == "error":
            self._fail(p, x, f"producer {p.name} refused the read: {msg.get('msg')}", release=False)
            return
        if why is not None:
            self._fail(p, x, why)  # the producer is told to release: this pair can never load
            if msg.get("op") == "accept":
                self._drain_into_scratch(p, x, raw)
            return
        starts, lens = _runs(len(x.local_ids), _breaks(x.local_ids), np.frombuffer(raw, dtype=np.int64))
        bb = self.conn.wire_layout["block_bytes"]
        with self._lock:
            if x.cancelled:
                self._drain_into_scratch(p, x, raw)
                return
            self._check_alive(p.ep)
            if self.on_gpu and not self.cuda_direct:
                x.staged = torch.empty((len(x.local_ids), bb), dtype=torch.uint8, pin_memory=True)
            for i, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
                if x.staged is not None:
                    dst = x.staged[s:s + n]
                elif self.on_gpu:
                    dst = self.conn._blocks[int(x.local_ids[s]):int(x.local_ids[s]) + n]
                else:
                    dst = self.conn._blocks_np[int(x.local_ids[s]):int(x.local_ids[s]) + n]
                x.recvs.append(p.ep.tag_recv(self._buffer(dst), self.conn._ucx.UCXXTag((x.id << 32) | i)))
        p.receiving[x.id] = x
        self._count_xfers()

    def _drain_into_scratch(self, p: _Ep, x: _Xfer, raw: bytes) -> None:
        """An accepted read nobody wants: receive its runs anyway, so the producer's sends end."""
        starts, lens = _runs(len(x.local_ids), _breaks(x.local_ids), np.frombuffer(raw, dtype=np.int64))
        bb = self.conn.wire_layout["block_bytes"]
        for i, n in enumerate(lens.tolist()):
            scratch = np.empty(n * bb, np.uint8)
            self._keep(p.ep.tag_recv(self._buffer(scratch), self.conn._ucx.UCXXTag((x.id << 32) | i)), scratch)
        self._send(p.ep, {"op": "release", "request_id": x.load.remote_request_id})
        x.settled.set()

    def _count_xfers(self) -> None:
        self.num_xfers = sum(len(q.receiving) for q in self._peers.values())

    def _finish(self, p: _Ep, x: _Xfer) -> None:
        p.receiving.pop(x.id, None)
        self._count_xfers()
        with self._lock:
            live = self._live.get(x.load.request_id) is x and not x.cancelled
            if live:
                del self._live[x.load.request_id]
                if x.staged is not None:
                    self.conn.write_blocks(x.local_ids, x.staged)
        x.settled.set()
        try:
            self._send(p.ep, {"op": "done" if live else "release", "request_id": x.load.remote_request_id})
        except ConnectionError:
            pass  # the bytes are here; the producer's hold expires
        if live:
            self.conn.count("bytes_received", len(x.local_ids) * self.conn.wire_layout["block_bytes"])
            self.conn.count("transfers")
            self.conn.load_done(x.load.request_id)

    def _fail(self, p: _Ep | None, x: _Xfer, why: str, release: bool = True) -> None:
        """``p`` None: the producer is gone or unreachable. Otherwise it is told to release unless
        it refused the read (it holds nothing for us). Either way finishing the request owes it
        no word, so the failure is reported as released."""
        if p is not None:
            p.asked.pop(x.id, None)
            p.receiving.pop(x.id, None)
            self._count_xfers()
        with self._lock:
            if self._live.get(x.load.request_id) is x:
                del self._live[x.load.request_id]
        if not x.cancelled:
            self.conn.load_failed(x.load.request_id, why, released=True)
        if release and p is not None:
            try:
                self._send(p.ep, {"op": "release", "request_id": x.load.remote_request_id})
            except Exception:  # noqa: BLE001
                pass
        if not x.recvs or x.next == len(x.recvs):
            x.settled.set()  # otherwise receives are still posted: settled when their endpoint closes

    def _fail_peer(self, key: tuple[str, int], p: _Ep, why: str) -> None:
        """Every load on a broken producer fails. Closing the endpoint cancels the posted receives,
        and it happens before any failure is reported: whoever sees the failure finds nothing of
        the peer left, and no byte can land in the failed requests' blocks."""
        doomed = list(p.asked.values()) + list(p.receiving.values())
        p.asked.clear()
        self._close_peer(key)
        for x in doomed:
            self._fail(None, x, why, release=False)

    def _close_peer(self, key: tuple[str, int]) -> None:
        p = self._peers.pop(key)
        self._close_ep(p.ep)
        for x in p.receiving.values():
            x.settled.set()
        p.receiving.clear()
        self.num_peers = len(self._peers)
        self._count_xfers()

    def _check_peers(self) -> None:
        now = time.monotonic()
        for key, p in list(self._peers.items()):
            silent = now - p.last_heard
            if p.busy and silent > self.conn.recv_timeout_s:
                got = sum(x.next for x in p.receiving.values())
                self._fail_peer(key, p, f"producer {p.name} sent nothing for {silent:.1f}s (unreachable, or died "
                                        f"mid-transfer): {got} runs received")
            elif not p.busy and silent > self.conn.peer_idle_s:
                self._close_peer(key)
