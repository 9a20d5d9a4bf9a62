"""The ``remote`` tier: blocks kept by a standalone LMCache server, shared by every instance.

A block is put under its prefix hash, so a prefix one instance computed is found by any other
instance pointed at the same server (``storage_tiers.lmcache_server`` starts one). The wire format
is LMCache's own (``lmcache.v1.protocol``: a fixed 186-byte request header — command, length,
format, dtype, shape, key string — then the payload; a 36-byte reply header), so LMCache's own
``python -m lmcache.v1.server`` serves it too (``storage_tiers.lmcache_server`` runs that server,
patched to answer block reads faster). Keys are LMCache ``CacheEngineKey`` strings
``{namespace}@1@0@{hex of the whole block hash}@uint8``; payloads are the block's raw bytes
(``MemoryFormat.BINARY``, shape ``[block_bytes]``).

Failure, by design never an error on the request path:

- **absent at start** — ``required=True`` (default): ``StorageTierError`` saying where it looked
  and how to start one. ``required=False``: a warning, and the tier starts *down*.
- **dies mid-run** — the call that notices gets misses (``contains`` False, ``get`` None, ``put``
  0), one warning per outage, ``failures`` counts it; no call blocks longer than ``io_timeout_s``.
- **visibility** — ``put`` returns only after the server confirmed it (a HEALTH round trip after
  the PUTs, which have no reply): a block another instance is told about is already there. This
  is what lets the ``lmcache`` connector hand a prefill to a decode instance through the server.
- **returns** — while down, each call first retries the connection, at most once per
  ``retry_interval_s``; on success it logs ``reconnected`` and serves again. The new server
  process is empty: what the old one held is gone, so those keys are misses until put again.

The server has no capacity or eviction (it keeps everything until it exits): ``capacity_bytes``
is 0 ("not managed here") and ``evict`` frees nothing. ``get`` returns fresh tensors, so nothing is
pinned and ``release`` is a no-op. One socket, one lock: calls are serialised, as the protocol
(request, reply, no ids) requires. lmcache is imported on first use, so importing this module
never needs it.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from storage_tiers.base import Key, StorageTier, StorageTierError, as_block_bytes

logger = logging.getLogger(__name__)

_WIRE_ERRORS = (OSError, ValueError, struct.error)  # ValueError: a reply header that is not one


def _protocol() -> Any:
    try:
        from lmcache.utils import CacheEngineKey
        from lmcache.v1 import protocol
        from lmcache.v1.memory_management import MemoryFormat
    except ImportError as e:
        raise StorageTierError(f"the remote tier speaks LMCache's protocol and needs lmcache installed "
                               f"(pip install 'kvfabric[lmcache]'): {e}") from e
    return CacheEngineKey, protocol, MemoryFormat


class RemoteTier(StorageTier):
    name = "remote"

    def __init__(self, host: str, port: int, block_bytes: int, *, required: bool = True,
                 namespace: str = "kvfabric", connect_timeout_s: float = 2.0, io_timeout_s: float = 10.0,
                 retry_interval_s: float = 1.0) -> None:
        super().__init__(block_bytes)
        self._Key, self._proto, fmt = _protocol()
        self._fmt = fmt.BINARY
        self.host, self.port, self.namespace = host, int(port), namespace
        self.connect_timeout_s, self.io_timeout_s = connect_timeout_s, io_timeout_s
        self.retry_interval_s = retry_interval_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_try = -float("inf")
        self._was_up = False
        self._counts = dict(hits=0, misses=0, puts=0, bytes_in=0, bytes_out=0, failures=0, reconnects=0)
        if not self._connect():
            msg = (f"no LMCache server at {host}:{port} (start one with "
                   f"`python -m storage_tiers.lmcache_server {host} {port}`, or an `lmcache_server` section "
                   f"for `kvfabric up`)")
            if required:
                raise StorageTierError(msg + "; the lmcache connector's `remote_required: false` starts without it")
            logger.warning("%s; starting with the remote tier down, retrying every %.1f s", msg, retry_interval_s)

    @classmethod
    def from_url(cls, url: str, block_bytes: int, **kwargs: Any) -> RemoteTier:
        """``lm://host:port`` (LMCache's own remote_url scheme)."""
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rstrip("/").rpartition(":")
        if scheme != "lm" or not host or not port.isdigit():
            raise ValueError(f"remote tier url must be lm://HOST:PORT, got {url!r}")
        return cls(host, int(port), block_bytes, **kwargs)

    # ---- connection --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _connect(self) -> bool:
        self._last_try = time.monotonic()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        except OSError:
            return False
        sock.settimeout(self.io_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        if self._was_up:
            self._counts["reconnects"] += 1
            logger.warning("remote tier: reconnected to the LMCache server at %s:%d", self.host, self.port)
        self._was_up = True
        return True

    def _ready(self) -> bool:
        if self._sock is None and time.monotonic() - self._last_try >= self.retry_interval_s:
            self._connect()
        return self._sock is not None

    def _fail(self, op: str, err: BaseException) -> None:
        self._counts["failures"] += 1
        if self._sock is not None:
            logger.warning("remote tier: LMCache server at %s:%d failed during %s (%s: %s); serving misses, "
                           "reconnecting every %.1f s", self.host, self.port, op, type(err).__name__, err,
                           self.retry_interval_s)
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._last_try = time.monotonic()

    # ---- wire --------------------------------------------------------------------------------

    def _key(self, key: Key) -> Any:
        return self._Key(self.namespace, 1, 0, int.from_bytes(key, "big"), torch.uint8)

    def _header(self, command: Any, key: Key, length: int = 0) -> bytes:
        p = self._proto
        shape = torch.Size([length]) if length else torch.Size([0, 0, 0, 0])
        return p.ClientMetaMessage(command, self._key(key), length, self._fmt, torch.uint8, shape).serialize()

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self._sock.recv_into(view[got:], len(view) - got)
            if n == 0:
                raise ConnectionError("server closed the connection")
            got += n

    def _reply(self) -> Any:
        buf = bytearray(self._proto.ServerMetaMessage.packlength())
        self._recv_into(memoryview(buf))
        return self._proto.ServerMetaMessage.deserialize(bytes(buf))

    def _exists(self, key: Key) -> bool:
        self._sock.sendall(self._header(self._proto.ClientCommand.EXIST, key))
        return self._reply().code == self._proto.ServerReturnCode.SUCCESS

    # ---- the tier interface ------------------------------------------------------------------

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        return self._lookup(keys, stop_at_miss=False)

    def count_prefix(self, keys: Sequence[Key]) -> int:
        held = self._lookup(keys, stop_at_miss=True)
        return sum(held)

    def _lookup(self, keys: Sequence[Key], stop_at_miss: bool) -> list[bool]:
        held = [False] * len(keys)
        with self._lock:
            if not keys or not self._ready():
                return held
            try:
                for i, k in enumerate(keys):
                    held[i] = self._exists(k)
                    if stop_at_miss and not held[i]:
                        break
            except _WIRE_ERRORS as e:
                self._fail("exists", e)
                return [False] * len(keys)
        return held

    def get(self, keys: Sequence[Key]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(keys)
        with self._lock:
            if self._ready():
                try:
                    for i, k in enumerate(keys):
                        self._sock.sendall(self._header(self._proto.ClientCommand.GET, k))
                        meta = self._reply()
                        if meta.code != self._proto.ServerReturnCode.SUCCESS:
                            continue
                        buf = torch.empty(meta.length, dtype=torch.uint8)
                        self._recv_into(memoryview(buf.numpy()))
                        if meta.length == self.block_bytes:  # a foreign writer's value under our key: a miss
                            out[i] = buf
                except _WIRE_ERRORS as e:
                    self._fail("get", e)
                    out = [None] * len(keys)
            hits = sum(b is not None for b in out)
            self._counts["hits"] += hits
            self._counts["misses"] += len(keys) - hits
            self._counts["bytes_out"] += hits * self.block_bytes
        return out

    def put(self, keys: Sequence[Key], buffers: Sequence[torch.Tensor] | torch.Tensor) -> int:
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        payloads = [as_block_bytes(b, self.block_bytes).cpu() for b in buffers]
        with self._lock:
            if not keys or not self._ready():
                return 0
            try:
                for k, data in zip(keys, payloads):
                    self._sock.sendall(self._header(self._proto.ClientCommand.PUT, k, self.block_bytes))
                    self._sock.sendall(memoryview(data.numpy()))
                self._barrier()
            except _WIRE_ERRORS as e:
                self._fail("put", e)
                return 0  # which of them the server stored before it failed is unknown
            self._counts["puts"] += len(keys)
            self._counts["bytes_in"] += len(keys) * self.block_bytes
        return len(keys)

    def _barrier(self) -> None:
        # PUT has no reply, and the server serves one connection's commands in order: once a HEALTH
        # sent after them is answered, every PUT before it is stored and visible to other clients.
        self._sock.sendall(self._header(self._proto.ClientCommand.HEALTH, b"\0"))
        if self._reply().code != self._proto.ServerReturnCode.SUCCESS:
            raise ValueError("the LMCache server did not confirm the puts")

    def flush(self) -> None:
        """Every put that returned a count is already stored (``put`` ends with a round trip)."""

    def health(self) -> bool:
        """One HEALTH round trip (reconnecting first if down)."""
        with self._lock:
            if not self._ready():
                return False
            try:
                self._barrier()
                return True
            except _WIRE_ERRORS as e:
                self._fail("health", e)
                return False

    @property
    def capacity_bytes(self) -> int:
        return 0  # the server keeps everything until it exits; its memory is not managed from here

    @property
    def used_bytes(self) -> int:
        return self._counts["bytes_in"]  # what this client put (other instances put more)

    def evict(self, nbytes: int) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counts, "connected": self._sock is not None, "url": f"lm://{self.host}:{self.port}"}

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                except OSError:
                    pass
                self._sock = None
            self._was_up = False
            self._last_try = float("inf")  # closed: never reconnect
