"""The disk tier: one file per block under a directory this tier owns, bounded by a byte cap (LRU).

File format (little-endian): ``KVFB`` magic, u16 version, u16 key length, u64 payload length,
u32 crc32 of key + payload, then the key, then the payload. Files live at
``<path>/<2 hex>/<blake2b-128(key) hex>.kvb``; the key inside the header is the real name.

- **Writes go behind the request**: ``put`` copies the bytes into a private buffer and queues the
  file write on a small thread pool, so the caller never waits for the disk. Until the file is in
  place the block is served from that buffer. A file is written under a temporary name and
  ``os.replace``d into place, so a reader or a restart sees either the whole file or none.
- **Reads** are one open and one read of the whole file into a fresh buffer; the checksum is
  checked on every read, and a file that fails it (or is short) is deleted and counted a miss.
- **Start-up** rebuilds the index from the files' headers (LRU order from their mtimes: a hit
  touches its file), deleting temporary files and torn or foreign ones. Checksums are not read
  then — that would read the whole tier — but on every get. No fsync: a file torn by a crash is
  caught by the size check at start-up or the checksum at read.
- **Disk full** (ENOSPC, EDQUOT): the write is dropped, the tier caps itself at what it holds now
  (later puts evict older files to make room), one warning is logged, and serving goes on from
  CPU or by recompute. A disk already full at start-up starts the tier capped at what it holds;
  an unwritable path is an error at construction, i.e. at start-up.
- One process per directory: an exclusive ``flock`` on ``<path>/.lock`` refuses a second one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storage_tiers.base import Key, StorageTier, StorageTierError, as_block_bytes
from storage_tiers.metrics import TierMetrics

logger = logging.getLogger(__name__)

MAGIC = b"KVFB"
VERSION = 1
_HDR = struct.Struct("<4sHHQI")
_SUFFIX = ".kvb"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _file_name(key: Key) -> str:
    return hashlib.blake2b(key, digest_size=16).hexdigest() + _SUFFIX


class DiskTier(StorageTier):
    name = "disk"

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, block_bytes: int, *, io_threads: int = 2,
                 max_pending_bytes: int = 256 << 20, registry: Any = None) -> None:
        super().__init__(block_bytes)
        self.root = Path(path)
        self._cap = int(capacity_bytes)
        self.configured_capacity_bytes = self._cap
        if self._cap < _HDR.size + self.block_bytes:
            raise StorageTierError(f"disk tier capacity {capacity_bytes} B holds no block of {block_bytes} B")
        self.max_pending_bytes = max(int(max_pending_bytes), self.block_bytes)
        # Writes behind are staged in slots allocated once: a fresh multi-MiB buffer per put costs
        # page faults that run slower than the disk itself on a VM.
        self._staging = torch.empty((self.max_pending_bytes // self.block_bytes, self.block_bytes), dtype=torch.uint8)
        self._free_staging = list(range(self._staging.shape[0] - 1, -1, -1))
        self.metrics = TierMetrics(self.name, registry)
        self._lock = threading.Lock()
        # Every accepted key -> its file size, least recently used first: recency is set by put and
        # get, never by when a write happens to finish.
        self._index: OrderedDict[Key, int] = OrderedDict()
        self._pending: dict[Key, _Write] = {}  # accepted, file not in place yet
        self._used = 0  # bytes of files in place or being written (less those evicted mid-write)
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._counts = dict(writes=0, dropped_writes=0, write_errors=0, corrupt=0, rejected=0, recovered=0,
                            recovered_deleted=0)
        self._warned: set[str] = set()
        self._closed = False
        self._full_at_start: OSError | None = None
        self._lock_fd = self._open_root()
        self._rebuild_index()
        if self._full_at_start is not None:
            self._cap = self._used
            self._warn_once("full", "disk tier %s: the disk is full at start (%s); capping the tier at the %d B it "
                                    "holds", self.root, self._full_at_start, self._cap)
        self._pool = ThreadPoolExecutor(max(1, int(io_threads)), thread_name_prefix="kv-disk-write")
        self._read_pool = ThreadPoolExecutor(max(2, int(io_threads)), thread_name_prefix="kv-disk-read")

    # ---- start-up -------------------------------------------------------------------------------

    def _open_root(self) -> int:
        hint = "check the disk tier's 'path' in the tiers config"
        probe = self.root / f".probe.{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                probe.write_bytes(b"kvfabric")
                os.replace(probe, self.root / f".probe.{os.getpid()}.done")
                os.unlink(self.root / f".probe.{os.getpid()}.done")
            except OSError as e:  # a full disk is writable: serve what it holds, as a write's ENOSPC does
                if e.errno not in _FULL_ERRNOS:
                    raise
                self._unlink(probe)
                self._full_at_start = e
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageTierError(f"disk tier path {str(self.root)!r} is not a writable directory: {e} ({hint})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StorageTierError(f"disk tier path {str(self.root)!r} is in use by another process ({hint})") from e
        free = shutil.disk_usage(self.root).free
        if free < self._cap:
            logger.warning("disk tier %s: capacity %d B but only %d B free on its disk; it will cap itself when "
                           "the disk fills", self.root, self._cap, free)
        return fd

    def _rebuild_index(self) -> None:
        found: list[tuple[float, Key, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sub.iterdir():
                key = self._check_header(f) if f.name.endswith(_SUFFIX) else None
                if key is None:  # a temporary file of a killed writer, a torn file, or not ours
                    self._unlink(f)
                    self._counts["recovered_deleted"] += 1
                    continue
                st = f.stat()
                found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found, key=lambda t: t[0]):
            self._index[key] = size
            self._used += size
        self._counts["recovered"] = len(self._index)
        self._evict_locked(self._used - self._cap)  # the cap may have shrunk since

    def _check_header(self, f: Path) -> Key | None:
        try:
            with open(f, "rb") as fh:
                head = fh.read(_HDR.size)
                if len(head) != _HDR.size:
                    return None
                magic, version, key_len, payload_len, _ = _HDR.unpack(head)
                key = fh.read(key_len)
            size = f.stat().st_size
        except OSError:
            return None
        if (magic != MAGIC or version != VERSION or payload_len != self.block_bytes or len(key) != key_len
                or size != _HDR.size + key_len + payload_len or f.name != _file_name(key)):
            return None
        return key

    # ---- reads ----------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def get(self, keys: Sequence[Key]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(keys)
        reads: list[tuple[int, int]] = []  # (index into keys, file size)
        with self._lock:
            for i in range(len(keys) - 1, -1, -1):  # tail first: the head ends most recently used
                size = self._index.get(keys[i])
                if size is None:
                    continue
                self._index.move_to_end(keys[i])
                w = self._pending.get(keys[i])
                if w is not None:
                    out[i] = w.data.clone()  # its staging slot is reused once the write ends
                else:
                    reads.append((i, size))
        # Several files in flight at once: small blocks are bound by the disk's IOPS, not bandwidth.
        if len(reads) > 1:
            bufs = self._read_pool.map(lambda r: self._read(keys[r[0]], r[1]), reads)
        else:
            bufs = (self._read(keys[i], size) for i, size in reads)
        for (i, _), buf in zip(reads, bufs):
            out[i] = buf
        hits = sum(b is not None for b in out)
        self.metrics.add("hits", hits)
        self.metrics.add("misses", len(keys) - hits)
        self.metrics.add("bytes_out", hits * self.block_bytes)
        return out

    def _read(self, key: Key, size: int) -> torch.Tensor | None:
        path = self._path(key)
        buf = torch.empty(size, dtype=torch.uint8)
        try:
            with open(path, "rb", buffering=0) as fh:
                n = fh.readinto(buf.numpy())
                while 0 < n < size:
                    got = fh.readinto(memoryview(buf.numpy())[n:])
                    if not got:
                        break
                    n += got
            os.utime(path)  # recency survives a restart
        except FileNotFoundError:  # evicted (or deleted by hand) since the lookup
            self._forget(key, size)
            return None
        except OSError as e:
            self._warn_once("read", "disk tier %s: read of %s failed: %s", self.root, path, e)
            return None
        raw = buf.numpy()
        ok = n == size >= _HDR.size
        if ok:
            magic, version, key_len, payload_len, crc = _HDR.unpack(raw[:_HDR.size].tobytes())
            body = _HDR.size + key_len
            ok = (magic == MAGIC and version == VERSION and payload_len == self.block_bytes
                  and body + payload_len == size and raw[_HDR.size:body].tobytes() == key
                  and zlib.crc32(raw[body:], zlib.crc32(key)) == crc)
        if not ok:
            logger.warning("disk tier %s: %s is corrupt (bad checksum, header or length): deleted", self.root, path)
            with self._lock:
                self._counts["corrupt"] += 1
                if key not in self._pending and self._index.pop(key, None) is not None:
                    self._used -= size
                    self._unlink(path)
            return None
        return buf[size - self.block_bytes:]

    # ---- writes ---------------------------------------------------------------------------------------

    def put(self, keys: Sequence[Key], buffers: Sequence[torch.Tensor] | torch.Tensor) -> int:
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        accepted = 0
        for k, src in zip(keys, buffers):
            size = self._file_size(k)
            with self._lock:
                if self._closed:
                    return accepted
                if k in self._index:
                    self._index.move_to_end(k)
                    continue
                if size > self._cap:  # capped by a full disk to less than one block
                    self._counts["rejected"] += 1
                    continue
                if not self._free_staging:
                    self._counts["dropped_writes"] += 1  # the disk is slower than demotions: never block
                    continue
                slot = self._free_staging.pop()
                w = _Write(k, self._staging[slot], size, slot)
                w.data.copy_(as_block_bytes(src, self.block_bytes))
                self._index[k] = size
                self._pending[k] = w
                self._inflight += 1
            self._pool.submit(self._write, w)
            accepted += 1
        return accepted

    def _write(self, w: _Write) -> None:
        # Room is made when the write starts, in recency order: the newest blocks push out the
        # oldest, whatever order the writes finish in.
        key, size = w.key, w.size
        with self._lock:
            if self._pending.get(key) is w:
                self._evict_locked(self._used + size - self._cap)
            if self._pending.get(key) is not w:  # evicted while queued (or by its own room-making)
                self._free_staging.append(w.slot)
                self._inflight -= 1
                self._idle.notify_all()
                return
            w.started = True
            self._used += size
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        payload = memoryview(w.data.numpy())
        header = _HDR.pack(MAGIC, VERSION, len(key), len(payload), zlib.crc32(payload, zlib.crc32(key))) + key
        error: OSError | None = None
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, header)
                _write_all(fd, payload)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            error = e
            self._unlink(tmp)
        with self._lock:
            if self._pending.get(key) is w:
                del self._pending[key]
            if w.doomed:  # evicted mid-write: its bytes were already given back
                if error is None:
                    self._unlink(path)
            elif error is None:
                self._counts["writes"] += 1
            else:
                self._index.pop(key, None)
                self._used -= size
            if error is not None:
                self._counts["write_errors"] += 1
                if error.errno in _FULL_ERRNOS:
                    self._cap = self._used  # what fits now; later writes evict older files to make room
            self._free_staging.append(w.slot)
            self._inflight -= 1
            self._idle.notify_all()
        if error is None:
            self.metrics.add("bytes_in", self.block_bytes)
        elif error.errno in _FULL_ERRNOS:
            self._warn_once("full", "disk tier %s: the disk is full (%s); capping the tier at %d B and serving "
                                    "from CPU or by recompute meanwhile", self.root, error, self._cap)
        else:
            self._warn_once("write", "disk tier %s: a block write failed: %s", self.root, error)

    # ---- eviction and bookkeeping -----------------------------------------------------------------------

    def _evict_locked(self, nbytes: int) -> None:
        """Evict in LRU order until ``nbytes`` are freed. A queued write is cancelled (it frees no
        bytes); one being written is deleted when it finishes (the cap may be overshot by the
        writes in flight, at most ``io_threads`` blocks). Unlinks happen under the lock, so a put of
        the same key that follows never has its fresh file deleted by a late unlink."""
        victims = []
        for key, size in self._index.items():
            if nbytes <= 0:
                break
            victims.append(key)
            w = self._pending.get(key)
            if w is None or w.started:
                nbytes -= size
        for key in victims:
            size = self._index.pop(key)
            w = self._pending.get(key)
            if w is None:
                self._used -= size
                self._unlink(self._path(key))
            else:
                del self._pending[key]
                if w.started:
                    self._used -= size
                    w.doomed = True
        self.metrics.add("evictions", len(victims))

    def evict(self, nbytes: int) -> int:
        with self._lock:
            before = self._used
            self._evict_locked(nbytes - (self._cap - self._used))
            return before - self._used

    def _forget(self, key: Key, size: int) -> None:
        with self._lock:
            if key not in self._pending and self._index.pop(key, None) is not None:
                self._used -= size

    def _path(self, key: Key) -> Path:
        name = _file_name(key)
        return self.root / name[:2] / name

    def _file_size(self, key: Key) -> int:
        return _HDR.size + len(key) + self.block_bytes

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def _warn_once(self, what: str, msg: str, *args: Any) -> None:
        with self._lock:
            if what in self._warned:
                return
            self._warned.add(what)
        logger.warning(msg, *args)

    @property
    def capacity_bytes(self) -> int:
        return self._cap

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = {**self._counts, "blocks": len(self._index) - len(self._pending), "pending_writes": len(self._pending),
                 "used_bytes": self._used, "capacity_bytes": self._cap,
                 "configured_capacity_bytes": self.configured_capacity_bytes, "disk_full": "full" in self._warned}
        return {**self.metrics.snapshot(), **s}

    def flush(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0)

    def close(self) -> None:
        if self._closed:
            return
        self.flush()  # accepted writes land, so a restart finds them
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
        self._read_pool.shutdown(wait=True)
        os.close(self._lock_fd)


@dataclass(eq=False)
class _Write:
    key: Key
    data: torch.Tensor
    size: int
    slot: int  # in the staging pool
    started: bool = False
    doomed: bool = False  # evicted while being written: delete the file when the write ends


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
