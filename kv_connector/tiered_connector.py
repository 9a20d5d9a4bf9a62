"""KV offload to storage tiers (CPU RAM → disk) and prefix reuse across requests and restarts.

Blocks are named by the engine's chained block hashes (``request.block_hashes``), so a block saved
by one request is found by any later request whose prompt starts with the same tokens — in this
engine, or after a restart when a disk tier is configured. One request's life here:

1. **matched** — ``get_num_new_matched_tokens`` counts the leading run of the request's full
   blocks, after those the prefix cache already has, that the tiers hold, leaving at least one
   token to compute (the step that samples needs its logits). It reads them at once (a disk hit
   is promoted to CPU) and keeps them *pinned*, so nothing can evict them before they are copied:
   a synchronous load that promised tokens must never find a block gone.
2. **allocated** — ``update_state_after_alloc`` pairs the pinned blocks with the local block ids
   that receive them.
3. **loaded** — ``build_connector_meta`` carries the loads to ``start_load_kv``, which copies the
   bytes into ``kv_cache[block_ids]`` before the forward (on GPU: H2D straight from the pinned CPU
   pool) and unpins them. Loads are synchronous: ``get_num_new_matched_tokens`` returns
   ``(n, False)`` and ``get_finished`` never reports anything.
4. **saved** — ``request_finished`` stores the request's full computed blocks that the tiers do
   not hold yet, and ``on_block_evicted`` stores a cached block the engine is about to reuse.
   Nothing is ever held for the tiers: they copy before returning.

Extra config (``kv_connector_extra_config``): the tiers config of ``storage_tiers.hierarchy``,
``{"cpu": {"capacity_bytes": ...}, "disk": {"path": ..., "capacity_bytes": ..., "write_through":
false, "io_threads": 2}}``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_connector.base import KVConnectorBase, KVTransferConfig, full_computed_blocks
from storage_tiers.hierarchy import TierHierarchy
from storage_tiers.metrics import LatencyMetrics

logger = logging.getLogger(__name__)


@dataclass
class TierLoad:
    """Tier blocks → local blocks; ``buffers`` stay pinned in the tiers until the copy is done."""

    request_id: str
    keys: list[bytes]
    block_ids: list[int]
    buffers: list[torch.Tensor]


@dataclass
class TieredMeta:
    loads: list[TierLoad] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loads)


@dataclass
class _Lease:
    first: int  # index of the first matched block in the request
    keys: list[bytes]
    buffers: list[torch.Tensor]


class TieredConnector(KVConnectorBase):
    name = "tiered"

    def __init__(self, config: KVTransferConfig, registry: Any = None) -> None:
        super().__init__(config)
        self.tiers_config = dict(config.kv_connector_extra_config)
        self.registry = registry
        self.tiers: TierHierarchy | None = None
        self.block_size = 0
        self.kv_cache: torch.Tensor | None = None
        self._blocks: torch.Tensor | None = None  # [num_blocks, block_bytes] uint8 view of kv_cache
        self._leases: dict[str, _Lease] = {}  # matched, not yet allocated
        self._loads: dict[str, TierLoad] = {}  # allocated, not yet copied
        self.latency = LatencyMetrics(registry)
        self._counters = dict(lookups=0, hit_tokens=0, loaded_blocks=0, saved_blocks=0, evicted_blocks_saved=0,
                              bytes_loaded=0, bytes_saved=0)
        self._closed = False

    # ---- scheduler half -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        rid = request.request_id
        self._unpin(self._leases.pop(rid, None))  # asked again: its allocation failed last time
        bs = self.block_size
        if self.tiers is None or num_computed_tokens % bs:
            return 0, False
        num_tokens = getattr(request, "num_tokens", len(request.prompt_token_ids))
        first = num_computed_tokens // bs
        last = min(len(request.block_hashes), (num_tokens - 1) // bs)  # >= 1 token left to compute
        self._counters["lookups"] += 1
        if last <= first:
            return 0, False
        keys = list(request.block_hashes[first:last])
        n = self.tiers.count_prefix(keys)
        if n == 0:
            return 0, False
        bufs = self.tiers.get(keys[:n])
        got = next((i for i, b in enumerate(bufs) if b is None), n)  # a corrupt disk file reads as a miss
        self.tiers.release([k for k, b in zip(keys[got:n], bufs[got:]) if b is not None])
        if got == 0:
            return 0, False
        self._leases[rid] = _Lease(first, keys[:got], bufs[:got])
        self._counters["hit_tokens"] += got * bs
        return got * bs, False

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        lease = self._leases.pop(request.request_id, None)
        if lease is None:
            return
        n = min(num_external_tokens // self.block_size, len(lease.keys))
        ids = list(block_ids[lease.first:lease.first + n])
        if len(ids) < n:
            logger.error("request %s: %d blocks allocated, the tier load needs [%d, %d): not loading",
                         request.request_id, len(block_ids), lease.first, lease.first + n)
            n = 0
        self.tiers.release(lease.keys[n:])
        if n:
            self._loads[request.request_id] = TierLoad(request.request_id, lease.keys[:n], ids, lease.buffers[:n])

    def build_connector_meta(self, scheduled: dict[str, int]) -> TieredMeta:
        # Loads stay here until start_load_kv takes them, so a step that skips the call loses none.
        return TieredMeta(list(self._loads.values()))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._unpin(self._leases.pop(rid, None))
        self._unpin(self._loads.pop(rid, None))
        if self.tiers is None or not block_ids:
            return False, None
        hashes, ids = full_computed_blocks(request, block_ids, self.block_size)
        if hashes:
            self._save(hashes, ids)
        return False, None

    def on_block_evicted(self, block_hash: bytes, block_id: int) -> None:
        if self.tiers is not None and self._save([block_hash], [block_id]):
            self._counters["evicted_blocks_saved"] += 1

    # ---- worker half ----------------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, layout: dict[str, Any]) -> None:
        expect = (layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
        if tuple(kv_cache.shape[1:]) != expect or not kv_cache.is_contiguous():
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} is not a contiguous [num_blocks, *{expect}]")
        self.kv_cache = kv_cache
        self.block_size = int(layout["block_size"])
        self._blocks = kv_cache.view(kv_cache.shape[0], -1).view(torch.uint8)
        self.tiers = TierHierarchy.from_config(self.tiers_config, self._blocks.shape[1], self.registry)

    def start_load_kv(self, meta: TieredMeta | None) -> None:
        for load in meta.loads if meta else ():
            if self._loads.get(load.request_id) is not load:
                continue  # aborted or finished since the meta was built
            del self._loads[load.request_id]
            t0 = time.perf_counter()
            try:
                self._copy_in(load.block_ids, load.buffers)
            finally:
                self._unpin(load)
            self.latency.observe("load", time.perf_counter() - t0)
            self._counters["loaded_blocks"] += len(load.keys)
            self._counters["bytes_loaded"] += len(load.keys) * self._blocks.shape[1]

    def _copy_in(self, block_ids: list[int], buffers: list[torch.Tensor]) -> None:
        # One copy per block, straight from the pinned pool into the cache: gathering them into one
        # tensor first would read every byte twice, and each copy moves a whole block (KiB–MiB),
        # so the per-call cost is noise.
        on_gpu = self._blocks.device.type == "cuda"
        for bid, buf in zip(block_ids, buffers):
            self._blocks[bid].copy_(buf, non_blocking=on_gpu)
        if on_gpu:  # the DMAs read the pinned slots we are about to unpin
            torch.cuda.current_stream(self._blocks.device).synchronize()

    def _save(self, keys: list[bytes], block_ids: list[int]) -> int:
        held = self.tiers.contains(keys)
        todo = [i for i, h in enumerate(held) if not h]
        if not todo:
            return 0
        t0 = time.perf_counter()
        ids = [block_ids[i] for i in todo]
        if self._blocks.device.type == "cpu":
            rows: Any = [self._blocks[b] for b in ids]  # views: the tier copies each block once
        else:  # one gather and one D2H for all of them, not a sync per block
            rows = self._blocks.index_select(0, torch.tensor(ids, device=self._blocks.device)).cpu()
        n = self.tiers.put([keys[i] for i in todo], rows)
        self.latency.observe("save", time.perf_counter() - t0)
        self._counters["saved_blocks"] += n
        self._counters["bytes_saved"] += n * self._blocks.shape[1]
        return n

    def _unpin(self, lease: _Lease | TierLoad | None) -> None:
        if lease is not None and self.tiers is not None:
            self.tiers.release(lease.keys)

    def get_finished(self) -> tuple[set[str], set[str], dict[str, str]]:
        return set(), set(), {}

    def abort(self, request_id: str) -> None:
        self._unpin(self._leases.pop(request_id, None))
        self._unpin(self._loads.pop(request_id, None))

    def stats(self) -> dict[str, Any]:
        return {"connector": self.name, "role": self.role.value, **self._counters,
                "loads_pending": len(self._loads), **self.latency.snapshot(),
                "tiers": self.tiers.stats() if self.tiers is not None else {}}

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for rid in list(self._leases) + list(self._loads):
            self.abort(rid)
        if self.tiers is not None:
            self.tiers.close()  # waits for writes behind, so a restart finds them
