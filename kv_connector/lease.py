"""Leases on held KV blocks: the one hold mechanism every pull transport shares.

A producer keeps a finished prefill's blocks allocated under a **lease** of ``lease_s`` seconds
(vLLM's 30 s by default). The consumer that will read them extends the lease with **renewals**
while the request waits on its side — queued behind other requests, not yet admitted, or
loading — so a long decode backlog never costs a hold. Blocks expire only when the consumer is
gone (a dead process sends no renewals) or stops renewing; a consumer's ``done`` or ``release``
ends the lease at once.

Producer side, ``LeaseTable`` (written by the scheduler thread, read by a transport's server
thread): ``hold`` → ``renew`` (any number of times) → ``release`` or expiry → ``poll`` reports
the blocks free once no reader pins them and every tracked send has finished.

Consumer side, ``Renewals`` (scheduler thread only): every request whose ``kv_transfer_params``
name held blocks is watched from the moment the engine queues it until the producer needs no
more word about it; ``due`` batches the watched request ids per producer every ``lease_s / 3``,
so one message renews all of a producer's waiting requests.

The control messages each transport carries on its own channel (JSON, nothing pickled):
``{"op": "renew", "request_ids": [...]}``, ``{"op": "done", "request_id"}``,
``{"op": "release", "request_id"}``; ``LeaseTable.on_control`` applies any of them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0  # vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT
RENEWS_PER_LEASE = 3  # a renewal may be lost or late twice before the lease runs out


def lease_seconds(extra: dict[str, Any]) -> float:
    """``lease_s`` from a connector's extra config (``expiry_s``: its old name, still read)."""
    value = float(extra.get("lease_s", extra.get("expiry_s", DEFAULT_LEASE_S)))
    if value <= 0:
        raise ValueError(f"lease_s must be positive, got {value}")
    return value


@dataclass
class _Lease:
    block_ids: list[int]
    deadline: float  # time.monotonic()
    readers: int = 0
    trackers: list[Any] = field(default_factory=list)  # objects with .done: bytes still being read
    released: str | None = None  # "done" | "release" | "aborted" | "expired"


class LeaseTable:
    """A producer's held requests, each under a lease its consumer renews."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._held: dict[str, _Lease] = {}
        self.renewals = 0  # request leases extended
        self.expired = 0

    def hold(self, request_id: str, block_ids: list[int]) -> None:
        with self._lock:
            self._held[request_id] = _Lease(list(block_ids), time.monotonic() + self.lease_s)

    def renew(self, request_ids: list[str]) -> int:
        """Extend the leases of those still held; how many were."""
        deadline, n = time.monotonic() + self.lease_s, 0
        with self._lock:
            for rid in request_ids:
                h = self._held.get(str(rid))
                if h is not None and h.released is None:
                    h.deadline = max(h.deadline, deadline)
                    n += 1
            self.renewals += n
        return n

    def pin(self, request_id: str, first: int, count: int) -> list[int] | str:
        """The block ids to read, pinned until ``unpin``; or why they cannot be read."""
        with self._lock:
            h = self._held.get(request_id)
            if h is None or h.released is not None or time.monotonic() > h.deadline:
                return f"request {request_id!r} is not held here (unknown, expired or released)"
            if first < 0 or count <= 0 or first + count > len(h.block_ids):
                return f"blocks [{first}, {first + count}) out of range: {len(h.block_ids)} held"
            h.readers += 1
            return h.block_ids[first:first + count]

    def unpin(self, request_id: str, trackers: list[Any] = ()) -> None:
        with self._lock:
            h = self._held.get(request_id)
            if h is not None:
                h.readers -= 1
                h.trackers.extend(t for t in trackers if t is not None)

    def release(self, request_id: str, reason: str) -> bool:
        with self._lock:
            h = self._held.get(request_id)
            if h is None or h.released is not None:
                return False
            h.released = reason
            return True

    def on_control(self, msg: dict[str, Any]) -> str | None:
        """Apply a consumer's ``renew``/``done``/``release``; the op applied (None: not one of them).
        ``release`` answers "released" when it ended a live hold (the caller counts it)."""
        op = msg.get("op")
        if op == "renew":
            self.renew(list(msg["request_ids"]))
            return op
        if op in ("done", "release"):
            ended = self.release(str(msg["request_id"]), op)
            return "released" if ended and op == "release" else op
        return None

    def poll(self) -> list[str]:
        """Ids whose blocks may be freed now; leases that ran out end here."""
        now, freed = time.monotonic(), []
        with self._lock:
            for rid, h in list(self._held.items()):
                if h.released is None and now > h.deadline:
                    h.released = "expired"
                    self.expired += 1
                    logger.warning("the lease on the KV blocks of %s ran out: its consumer stopped renewing", rid)
                if h.released is not None and h.readers == 0 and all(t.done for t in h.trackers):
                    del self._held[rid]
                    freed.append(rid)
        return freed

    def counts(self) -> tuple[int, int]:
        """(requests held, blocks held)."""
        with self._lock:
            return len(self._held), sum(len(h.block_ids) for h in self._held.values())


class Renewals:
    """A consumer's watched hand-offs: which producer holds what for it, and when to renew."""

    def __init__(self) -> None:
        self._watched: dict[str, dict[str, Any]] = {}  # our request id -> its kv_transfer_params
        self._next = math.inf  # time.monotonic() of the next round
        self.sent = 0  # renew messages
        self.renewed = 0  # request leases asked for

    def watch(self, request_id: str, params: dict[str, Any]) -> None:
        self._watched[request_id] = params
        # Its lease was just granted: the first renewal is due a third of it from now (sooner than
        # the round the others set, if its lease is shorter).
        lease_s = float(params.get("lease_s", DEFAULT_LEASE_S))
        self._next = min(self._next, time.monotonic() + lease_s / RENEWS_PER_LEASE)

    def unwatch(self, request_id: str) -> None:
        self._watched.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._watched

    def __len__(self) -> int:
        return len(self._watched)

    def due(self) -> dict[tuple[str, int], tuple[dict[str, Any], list[str]]]:
        """Once every (shortest lease) / 3: {producer endpoint: (one request's params, remote ids)}."""
        now = time.monotonic()
        if not self._watched:
            self._next = math.inf
        if now < self._next:
            return {}
        by_peer: dict[tuple[str, int], tuple[dict[str, Any], list[str]]] = {}
        shortest = DEFAULT_LEASE_S
        groups: dict[tuple[str, int], list[str]] = defaultdict(list)
        for params in self._watched.values():
            key = (str(params["remote_host"]), int(params["remote_port"]))
            groups[key].append(str(params["remote_request_id"]))
            by_peer.setdefault(key, (params, groups[key]))
            shortest = min(shortest, float(params.get("lease_s", DEFAULT_LEASE_S)))
        self._next = now + shortest / RENEWS_PER_LEASE
        self.sent += len(by_peer)
        self.renewed += sum(len(ids) for ids in groups.values())
        return by_peer
