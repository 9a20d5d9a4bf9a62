"""Producer holds, consumer pulls: the bookkeeping every pull-model connector shares (zmq, inproc).

A transport subclass only moves bytes; the life cycle of one hand-off lives here.

Producer side (engine in kv_producer role, or kv_both with ``do_remote_decode``):

1. **held** — ``request_finished`` puts the request's blocks in the ``LeaseTable`` (lease.py)
   under the producer's request id and returns ``kv_transfer_params`` (where the blocks are,
   which ids, how many tokens, ``lease_s``). The scheduler keeps the blocks allocated; while
   they fill more than ``max_held_fraction`` of the cache it admits no new prompt.
2. **serving** — a consumer reads them. A read *pins* the entry, so expiry can never free blocks
   while bytes are still being read from them (zero-copy sends read them after ``send`` returns).
3. **released** — the consumer says ``done`` (or ``release`` on abort or failure), or it stops
   renewing and the lease runs out. Once nothing reads the blocks any more, ``get_finished``
   reports the id in ``finished_sending`` and the scheduler frees them.

Consumer side (the request's ``kv_transfer_params`` carry ``remote_block_ids``):

0. **queued** — ``request_added``: from the moment the engine queues the request its lease is
   renewed (``renew`` every ``lease_s / 3``, one message per producer), until it is loaded,
   failed, aborted or finished.
1. **matched** — ``get_num_new_matched_tokens`` → ``(num_tokens - num_computed_tokens, True)``.
2. **allocated** — ``update_state_after_alloc`` pairs the remote blocks with local ones, skipping
   the leading blocks already covered by local prefix hits.
3. **loading** — ``build_connector_meta`` carries the load to the worker half until
   ``start_load_kv`` starts it.
4. **loaded** (``finished_recving``; the producer was told ``done``) | **failed**
   (``failed_recving`` with the reason; the producer is told ``release``) | **aborted** (reported nowhere; the producer is told
   ``release`` at once and no byte lands in the request's blocks after ``abort`` returns).
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kv_connector.base import KVConnectorBase, KVConnectorRole, KVTransferConfig
from kv_connector.block_copy import ids_on, is_run
from kv_connector.lease import LeaseTable, Renewals, lease_seconds

logger = logging.getLogger(__name__)

# What must agree between the two caches for raw block bytes to mean the same thing.
LAYOUT_KEYS = ("block_size", "num_layers", "num_kv_heads", "head_dim", "dtype", "block_bytes")


def layout_mismatch(here: dict[str, Any], there: dict[str, Any], there_name: str) -> str | None:
    """A readable error when two caches' block layouts differ, else None."""
    keys = LAYOUT_KEYS + (("layout",) if "layout" in here and "layout" in there else ())
    diffs = [f"{k} {here.get(k)!r} here != {there.get(k)!r} on {there_name}" for k in keys
             if here.get(k) != there.get(k)]
    if not diffs:
        if here.get("model_id") != there.get("model_id"):  # paths differ across hosts: warn only
            logger.warning("model_id %r here, %r on %s", here.get("model_id"), there.get("model_id"), there_name)
        return None
    return "KV layout mismatch: " + ", ".join(diffs)


@dataclass
class Load:
    """One consumer pull: remote blocks [first, first + count) of a held request → local_block_ids."""

    request_id: str
    local_block_ids: list[int]
    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_request_id: str
    first: int
    count: int
    params: dict[str, Any] | None = field(default=None, repr=False)  # the request's kv_transfer_params


@dataclass
class HandoffMeta:
    """What the worker half must do this step. Falsy when there is nothing to do."""

    loads: list[Load] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loads)


class HandoffConnector(KVConnectorBase):
    """The scheduler half and the block I/O of a pull connector; transports fill in the hooks."""

    name = "handoff"

    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__(config)
        self.lease_s = lease_seconds(config.kv_connector_extra_config)
        self.max_held_fraction = float(config.extra("max_held_fraction", 0.5))
        self.holds = LeaseTable(self.lease_s)
        self.renewals = Renewals()  # consumer: the leases we keep alive, scheduler thread only
        self.kv_cache: torch.Tensor | None = None
        self.wire_layout: dict[str, Any] = {}
        self._blocks: torch.Tensor | None = None  # [num_blocks, block_bytes] uint8 view of kv_cache
        self._blocks_np: np.ndarray | None = None  # the same memory, for CPU caches
        self._copy_stream: Any = None  # device caches: where loads are uploaded
        # Consumer state, scheduler thread only.
        self._remote: dict[str, dict[str, Any]] = {}  # hand-offs we still owe a done/release
        # Consumer requests the producer needs no more word about: loaded (done sent), or failed in
        # the transport, which released the blocks itself or found the producer gone.
        self._settled: set[str] = set()
        self._matched: dict[str, int] = {}  # request_id -> locally computed tokens at match time
        self._unstarted: dict[str, Load] = {}
        self._pending: set[str] = set()  # loads whose result get_finished has yet to report
        # Written by transport threads.
        self._recved: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._failed: queue.SimpleQueue[tuple[str, str, bool]] = queue.SimpleQueue()
        self._counters_lock = threading.Lock()
        self._counters = dict(bytes_sent=0, bytes_received=0, transfers=0, failures=0,
                              released_early=0, aborted=0)
        self._closed = False

    # ---- transport hooks ------------------------------------------------------------------------

    @abstractmethod
    def _start_transport(self) -> None: ...

    @abstractmethod
    def _endpoint(self) -> tuple[str, int]: ...

    @abstractmethod
    def _start_load(self, load: Load) -> None: ...

    @abstractmethod
    def _cancel_load(self, request_id: str) -> None:
        """Synchronous: no byte may be written for request_id once this returns."""

    @abstractmethod
    def _send_control(self, params: dict[str, Any], msg: dict[str, Any]) -> None:
        """Send ``msg`` (lease.py's renew/done/release) to the producer that ``params`` name."""

    @abstractmethod
    def _stop_transport(self) -> None: ...

    # ---- called by transports --------------------------------------------------------------------

    def on_control(self, msg: dict[str, Any]) -> bool:
        """Producer: apply a consumer's renew/done/release; False when ``msg`` is none of them."""
        op = self.holds.on_control(msg)
        if op == "released":
            self.count("released_early")
        return op is not None

    def _release_remote(self, params: dict[str, Any]) -> None:
        self._send_control(params, {"op": "release", "request_id": params["remote_request_id"]})

    def count(self, key: str, n: int = 1) -> None:
        with self._counters_lock:
            self._counters[key] += n

    def load_done(self, request_id: str) -> None:
        self._recved.put(request_id)

    def load_failed(self, request_id: str, why: str, released: bool = False) -> None:
        """``released``: the transport told the producer to release, or found it gone; finishing
        the request then sends nothing (a release to a dead producer would open a new connection)."""
        self._failed.put((request_id, why, released))

    def write_blocks(self, local_ids: np.ndarray, src: torch.Tensor | np.ndarray, wait: bool = True) -> None:
        """Copy ``src`` ([n, block_bytes] uint8) into local blocks ``local_ids``. A device cache copies
        on ``_copy_stream``; ``wait=False`` returns before the copy ends (the caller syncs)."""
        n, contiguous = len(local_ids), is_run(np.asarray(local_ids))
        if self._blocks_np is not None:
            src_np = src.cpu().numpy() if isinstance(src, torch.Tensor) else src
            if contiguous:
                self._blocks_np[local_ids[0]:local_ids[0] + n] = src_np
            else:
                self._blocks_np[local_ids] = src_np
            return
        # Device cache: a side stream, so the upload neither waits for nor blocks the forward; we
        # wait for it because the caller reuses its (pinned) source buffer for the next frame.
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self._blocks.device)
        src_t = torch.from_numpy(src) if isinstance(src, np.ndarray) else src
        with torch.cuda.stream(self._copy_stream):
            if contiguous:  # one DMA straight from the (pinned) source
                self._blocks[int(local_ids[0]):int(local_ids[0]) + n].copy_(src_t, non_blocking=True)
            else:  # one DMA, one scatter: a DMA per block costs more; the index goes up pinned, because
                # a pageable copy would wait for everything queued on this stream
                dev = self._blocks.device
                self._blocks.index_copy_(0, ids_on(local_ids, dev), src_t.to(dev, non_blocking=True))
        if wait:
            self._copy_stream.synchronize()

    # ---- scheduler half ---------------------------------------------------------------------------

    def _pulls(self, request: Any) -> bool:
        """A consumer's request whose params name blocks a producer of our kind holds for it."""
        params = request.kv_transfer_params
        return (self.role != KVConnectorRole.PRODUCER and bool(params) and "remote_block_ids" in params
                and params.get("do_remote_prefill") is not False and request.request_id not in self._settled
                and params.get("kv_connector", self.name) == self.name)

    def request_added(self, request: Any) -> None:
        if self._pulls(request):  # its lease is renewed while it waits in the engine's queue
            self.renewals.watch(request.request_id, request.kv_transfer_params)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if (self.role == KVConnectorRole.PRODUCER or not params or "remote_block_ids" not in params
                or params.get("do_remote_prefill") is False or request.request_id in self._settled):
            return 0, False  # settled: loaded once already (a preempted request recomputes)
        rid = request.request_id
        # Leave at least one token to compute: the step that samples needs its logits.
        num_request_tokens = getattr(request, "num_tokens", len(request.prompt_token_ids))
        n = min(int(params["num_tokens"]), num_request_tokens - 1) - num_computed_tokens
        if n <= 0:  # local prefix hits cover it: free the producer's copy now, not at expiry
            self.renewals.unwatch(rid)
            self._settled.add(rid)
            self._release_remote(params)
            self.count("released_early")
            return 0, False
        if params.get("kv_connector", self.name) == self.name:
            self.renewals.watch(rid, params)  # requests added before the engine called request_added
        self._remote[rid] = params
        self._matched[rid] = num_computed_tokens
        return n, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        rid = request.request_id
        num_local = self._matched.pop(rid, None)
        if num_local is None or num_external_tokens == 0:
            return
        params = self._remote[rid]
        bs = self.wire_layout["block_size"]
        skip = num_local // bs  # prefix hits are whole blocks
        count = -(-(num_local + num_external_tokens) // bs) - skip
        self._pending.add(rid)
        if params.get("kv_connector", self.name) != self.name:
            self.load_failed(rid, f"kv_transfer_params come from a {params['kv_connector']!r} producer; "
                                  f"this engine's connector is {self.name!r}")
            return
        if len(block_ids) < skip + count or len(params["remote_block_ids"]) < skip + count:
            self.load_failed(rid, f"need blocks [{skip}, {skip + count}): {len(block_ids)} allocated, "
                                  f"{len(params['remote_block_ids'])} remote")
            return
        self._unstarted[rid] = Load(rid, list(block_ids[skip:skip + count]), params["remote_engine_id"],
                                    params["remote_host"], int(params["remote_port"]),
                                    params["remote_request_id"], skip, count, params)

    def build_connector_meta(self, scheduled: dict[str, int]) -> HandoffMeta:
        # Loads stay here until start_load_kv takes them, so a step that skips the call loses none.
        return HandoffMeta(list(self._unstarted.values()))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        if rid in self._remote or rid in self._pending:
            self.abort(rid)  # finished before its load did: its blocks are about to be freed
        elif self._pulls(request):
            self._release_remote(request.kv_transfer_params)  # finished before it was even matched
            self.count("released_early")
        self.renewals.unwatch(rid)
        self._settled.discard(rid)
        if not self._sends(request, block_ids):
            return False, None
        self.holds.hold(rid, block_ids)
        host, port = self._endpoint()
        return True, {
            "kv_connector": self.name, "remote_engine_id": self.engine_id, "remote_host": host,
            "remote_port": port, "remote_block_ids": list(block_ids), "remote_request_id": rid,
            "num_tokens": int(request.num_computed_tokens), "lease_s": self.lease_s,
            "block_size": self.wire_layout["block_size"],
        }

    def held_block_budget(self, num_blocks: int) -> int | None:
        if self.role == KVConnectorRole.CONSUMER or self.max_held_fraction >= 1.0:
            return None
        return max(1, int(self.max_held_fraction * num_blocks))

    def _sends(self, request: Any, block_ids: list[int]) -> bool:
        if self.role == KVConnectorRole.CONSUMER or not block_ids or request.num_computed_tokens <= 0:
            return False
        # Only a prefill that stopped for length (its max_tokens=1) continues elsewhere: one that
        # hit EOS or a stop string is complete, and nobody comes for an aborted one.
        if getattr(getattr(request, "status", None), "finish_reason", "length") != "length":
            return False
        return bool((request.kv_transfer_params or {}).get("do_remote_decode"))

    # ---- worker half --------------------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, layout: dict[str, Any]) -> None:
        expect = (layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
        if tuple(kv_cache.shape[1:]) != expect or not kv_cache.is_contiguous():
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} is not a contiguous [num_blocks, *{expect}]")
        if str(kv_cache.dtype).removeprefix("torch.") != layout["dtype"]:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} != layout dtype {layout['dtype']}")
        self.kv_cache = kv_cache
        self._blocks = kv_cache.view(kv_cache.shape[0], -1).view(torch.uint8)
        self._blocks_np = self._blocks.numpy() if kv_cache.device.type == "cpu" else None
        self.wire_layout = {**layout, "block_bytes": self._blocks.shape[1]}
        self._start_transport()

    def start_load_kv(self, meta: HandoffMeta | None) -> None:
        for load in meta.loads if meta else ():
            if self._unstarted.get(load.request_id) is load:
                del self._unstarted[load.request_id]
                self._start_load(load)

    def get_finished(self) -> tuple[set[str], set[str], dict[str, str]]:
        sent = self.holds.poll()
        for params, remote_ids in self.renewals.due().values():
            self._send_control(params, {"op": "renew", "request_ids": remote_ids})
        recved: set[str] = set()
        failed: dict[str, str] = {}
        released: set[str] = set()
        while not self._recved.empty():
            recved.add(self._recved.get())
        while not self._failed.empty():
            rid, why, was_released = self._failed.get()
            failed[rid] = why
            if was_released:
                released.add(rid)
        # Only what is still pending: an aborted load's late result is nobody's business.
        recved &= self._pending
        failed = {rid: why for rid, why in failed.items() if rid in self._pending and rid not in recved}
        self._settled |= recved | failed.keys()
        for rid in recved | failed.keys():
            self._pending.discard(rid)
            self.renewals.unwatch(rid)
            params = self._remote.pop(rid, None)
            if rid in failed and rid not in released and params is not None:
                self._release_remote(params)  # whatever the engine does next, it will not read them
        if failed:
            self.count("failures", len(failed))
            for rid, why in failed.items():
                logger.error("KV load of %s failed: %s", rid, why)
        return set(sent), recved, failed

    def abort(self, request_id: str) -> None:
        # Producer side: nobody will come for these blocks; free them now, not at expiry.
        if self.holds.release(request_id, "aborted"):
            self.count("released_early")
        self._matched.pop(request_id, None)
        self._unstarted.pop(request_id, None)
        self.renewals.unwatch(request_id)
        if request_id in self._pending:
            self._pending.discard(request_id)
            self._cancel_load(request_id)
        params = self._remote.pop(request_id, None)
        if params is not None:
            self._release_remote(params)
            self.count("aborted")

    def stats(self) -> dict[str, Any]:
        held_requests, held_blocks = self.holds.counts()
        with self._counters_lock:
            counters = dict(self._counters)
        return {"connector": self.name, "role": self.role.value, **counters, "held_requests": held_requests,
                "held_blocks": held_blocks, "loads_in_flight": len(self._pending), "lease_s": self.lease_s,
                "expired": self.holds.expired, "leases_renewed": self.holds.renewals,
                "renewals_sent": self.renewals.sent, "leases_watched": len(self.renewals)}

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_transport()
