"""One-sided reads for the ``ipc`` connector: the consumer copies a finished prefill's blocks out of
the producer's memory with no message before the copy, and says ``done`` after it.

A read that first asks the producer costs a round trip through both processes' Python threads,
0.5-0.8 ms on an H200 host (docs/BENCHMARKS.md): at 64 MB that is as long as the copy. So, as
NIXL's READ does, the producer puts everything a reader needs in ``kv_transfer_params["ipc"]``: which
memory (its shared host cache, or its GPU cache over CUDA IPC), its layout, and a *hold word*.

The hold word is how a reader knows the blocks stayed the producer's while it copied, with no
lock and no message: ``HoldBoard`` is a small shared array; a hold gets a slot holding a random
token and a hash of its request id (so params naming another request do not pass); the producer
zeroes the slot when the hold ends (done, release, abort, expiry), in the same
``get_finished`` call that hands the blocks back to its scheduler, so before they can be reused.
The reader checks the token before its copy and again once the copy has ended: still there means
no reuse can have begun before the copy ended. Otherwise the load fails and the request is
prefilled again on the decode side; a stale byte is never used.

``DirectReader`` runs on the consumer's scheduler thread: ``start`` queues the copy on the copy
stream (a GPU cache) or does it (a host cache), ``poll`` finishes the loads whose copies ended,
``cancel`` waits for one to end. Mappings of producers' memory are kept for reuse, at most
``_MAX_MAPPINGS`` of them.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kv_connector import cuda_ipc
from kv_connector.block_copy import copy_rows
from kv_connector.handoff import Load, layout_mismatch
from kv_connector.shm_segment import ShmSegment

logger = logging.getLogger(__name__)

_MAX_MAPPINGS = 8  # producers' memories kept mapped here (a host cache mapping pins its pages)


def request_word(request_id: str) -> int:
    """A hold's second word: its request id, hashed into 63 bits."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little") >> 1


class HoldBoard:
    """The producer's hold words: a (token, request word) int64 pair per held request, in shared memory."""

    def __init__(self, slots: int) -> None:
        self.seg = ShmSegment.create(slots * 16, pin=False)
        self.words = self.seg.buf.view(torch.int64).numpy().reshape(slots, 2)
        self.words[:] = 0
        self._free = list(range(slots - 1, -1, -1))
        self._slots: dict[str, int] = {}  # request id -> slot

    def hold(self, request_id: str) -> dict[str, Any] | None:
        """A slot and token for a new hold (None when the board is full: readers ask first)."""
        self.end(request_id)
        if not self._free:
            return None
        slot, token = self._free.pop(), secrets.randbits(62) + 1
        self.words[slot] = (token, request_word(request_id))
        self._slots[request_id] = slot
        return {"board": {"name": self.seg.name, "nbytes": self.seg.nbytes}, "slot": slot, "token": token}

    def end(self, request_id: str) -> None:
        """The hold is over: from here on its blocks may be reused, and readers will see it."""
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self.words[slot, 0] = 0  # the token alone ends it: readers compare it last
            self._free.append(slot)

    def close(self) -> None:
        """Every hold ends: a reader still copying from a cache that goes with this engine fails its load."""
        self.words[:, 0] = 0
        self.words = None
        self.seg.close()


@dataclass
class _Read:
    load: Load
    done: Any  # a CUDA event, or None when the copy has already ended
    words: np.ndarray
    keys: tuple[str, str]  # the mappings it reads: kept mapped until it is finished
    slot: int
    token: int
    nbytes: int


class DirectReader:
    """The consumer's one-sided reads. ``conn``: the IpcConnector (its cache, layout and counters)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._reads: dict[str, _Read] = {}
        self._maps: collections.OrderedDict[str, Any] = collections.OrderedDict()  # key -> mapping, LRU last
        self._refused: set[str] = set()  # memories that did not map here: those producers are asked first

    def start(self, load: Load) -> bool:
        """Read ``load`` one-sided if its producer offered it and its memory maps here; False: ask."""
        ipc = (load.params or {}).get("ipc")
        conn = self.conn
        if not ipc or ipc.get("machine") != conn.machine:
            return False
        if ipc["memory"] == "cuda" and not (conn.on_gpu and conn.use_cuda_ipc and ipc.get("pid") != os.getpid()):
            return False  # CUDA IPC maps another process's memory only, into a GPU
        where = f"producer {load.remote_host}:{load.remote_port}"
        why = layout_mismatch(conn.wire_layout, ipc["layout"], where)
        if why is not None:
            conn.read_failed(load, why)
            return True
        keys = (self._key(ipc), ipc["board"]["name"])
        try:
            src = self._mapped(ipc)
            words = self._mapped({"memory": "board", "segment": ipc["board"]})
        except (OSError, RuntimeError, ValueError) as e:
            logger.info("memory of %s does not map here (%s): asking it instead", where, e)
            return False
        finally:
            self._evict(keep=keys)  # after both are mapped: neither may go while this read is set up
        slot, token = int(ipc["slot"]), int(ipc["token"])
        remote = np.asarray(load.params["remote_block_ids"][load.first:load.first + load.count], dtype=np.int64)
        if not 0 <= slot < len(words) or len(remote) != load.count or remote.min() < 0 or remote.max() >= len(src):
            conn.read_failed(load, f"{where} sent kv_transfer_params naming blocks or a hold slot "
                                              "outside its memory")
            return True
        if words[slot, 0] != token or words[slot, 1] != request_word(load.remote_request_id):
            conn.read_failed(load, f"{where}: request {load.remote_request_id!r} is not held here (unknown, "
                                   "expired or released)")
            return True
        local = np.asarray(load.local_block_ids, dtype=np.int64)
        done = None
        if conn.on_gpu:
            with torch.cuda.stream(conn._copy_stream):
                copy_rows(conn._blocks, local, src, remote)
                done = torch.cuda.Event()
                done.record()
        else:
            copy_rows(conn._blocks, local, src, remote)
        self._reads[load.request_id] = _Read(load, done, words, keys, slot, token,
                                           len(remote) * src.shape[1])
        return True

    def poll(self) -> None:
        """Finish every read whose copy has ended: loaded if the hold outlasted it, else failed."""
        for rid, r in list(self._reads.items()):
            if r.done is not None and not r.done.query():
                continue
            del self._reads[rid]
            if r.words[r.slot, 0] != r.token:
                self.conn.read_failed(r.load, f"producer {r.load.remote_host}:{r.load.remote_port} ended its hold "
                                           "while the blocks were being copied; they may have been reused")
                continue
            self.conn.read_done(r.load, r.nbytes)

    def cancel(self, request_id: str) -> bool:
        """No byte of ``request_id`` lands after this returns. False: not a one-sided read."""
        r = self._reads.pop(request_id, None)
        if r is not None and r.done is not None:
            r.done.synchronize()
        return r is not None

    def __len__(self) -> int:
        return len(self._reads)

    @property
    def num_mappings(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        if self.conn._copy_stream is not None:
            self.conn._copy_stream.synchronize()
        self._reads.clear()
        while self._maps:
            self._maps.popitem()[1].close()

    def _mapped(self, where: dict[str, Any]) -> Any:
        """``where``'s memory mapped here: rows of block bytes, or a board's words."""
        key = self._key(where)
        if key in self._refused:
            raise RuntimeError("mapping it failed before")
        m = self._maps.get(key)
        if m is None:
            try:
                if where["memory"] == "cuda":
                    m = cuda_ipc.Mapping(where["export"], self.conn._blocks.device)
                else:
                    seg = where["segment"]
                    m = ShmSegment.open(seg["name"], int(seg["nbytes"]), pin=where["memory"] == "host"
                                        and self.conn.on_gpu)
            except (OSError, RuntimeError, ValueError):
                self._refused.add(key)
                raise
            self._maps[key] = m
        self._maps.move_to_end(key)
        if where["memory"] == "board":
            return m.buf.view(torch.int64).numpy().reshape(-1, 2)
        return m.buf.view(-1, self.conn.wire_layout["block_bytes"])

    @staticmethod
    def _key(where: dict[str, Any]) -> str:
        return where["export"]["handle"] if where["memory"] == "cuda" else where["segment"]["name"]

    def _evict(self, keep: tuple[str, ...]) -> None:
        """Unmap the least recently used beyond _MAX_MAPPINGS that neither an unfinished read nor
        ``keep`` names."""
        if len(self._maps) <= _MAX_MAPPINGS:
            return
        in_use = {k for r in self._reads.values() for k in r.keys} | set(keep)
        doomed = [k for k in self._maps if k not in in_use][:len(self._maps) - _MAX_MAPPINGS]
        if doomed and self.conn._copy_stream is not None:
            self.conn._copy_stream.synchronize()  # no queued copy reads what goes
        for key in doomed:
            self._maps.pop(key).close()
