"""``lmcache``: prefix reuse through LMCache's own cache engine, with its server as a shared tier.

LMCache's ``LMCacheEngine`` (0.5.x) stores and retrieves KV chunks; its storage backends
(``local_cpu``, ``local_disk``, any ``remote_url`` it supports) come from LMCache's configuration,
passed through unchanged. One request's life here (loads are synchronous, like ``tiered``):

1. **matched** — ``get_num_new_matched_tokens`` asks LMCache how many of the request's chunks after
   the prefix-cache hits it holds (``LMCacheEngine.lookup(hashes=, pin=True)``: pinned until
   loaded), then asks the ``remote`` tier (an LMCache server) for the blocks after those, reading
   them at once. At least one prompt token is always left to compute.
2. **allocated** — ``update_state_after_alloc`` pairs the match with the request's block ids.
3. **loaded** — ``start_load_kv`` runs ``LMCacheEngine.retrieve`` (its memory objects are copied
   into ``kv_cache[block_ids]``) and copies the remote blocks, then unpins.
4. **saved** — ``request_finished`` stores the request's full computed chunks that LMCache does not
   hold (``LMCacheEngine.store(hashes=, offsets=)``) and puts to the remote tier the blocks it lacks
   (except in the ``kv_consumer`` role, below). A block that came from the remote tier is stored in
   LMCache here too: the next hit is local.

**Keys: no recomputation.** LMCache's ``chunk_size`` must be ``k × block_size`` (default: ``k = 1``,
``chunk_size = block_size``). Chunk ``c`` covers our blocks ``[c·k, (c+1)·k)``; its LMCache chunk hash
is our chained hash of its *last* block (which already names every token before it), folded to
LMCache's 64-bit int the way LMCache folds vLLM's byte hashes (first 8 bytes, big-endian). LMCache's
token hashing never runs: ``store`` and ``lookup`` take the hashes; ``retrieve`` takes a token list
that carries them (``_HashedPrompt``), read by ``_BlockHashDatabase``. Only full chunks are cached.

**Layout.** A chunk's LMCache memory object is LMCache's ``KV_2LTD``: ``[2, num_layers, chunk_size,
num_kv_heads·head_dim]``. ``_BlockMajorKV`` is the ``GPUConnectorInterface`` that moves it to and
from our block-major ``[num_blocks, num_layers, 2, block_size, heads, head_dim]`` cache with plain
torch, no LMCache CUDA kernel (``lmcache.cuda_ops`` is built against one torch and need not load).
The memory objects live where LMCache allocates them (host memory, pinned when there is a GPU); per
chunk, a save is a gather + permute on the cache's device and one copy out, a load one copy in and
a permuted ``index_copy_`` on the cache's device, skipping blocks the prefix cache already had.

**Prefill → decode through LMCache.** Two engines that share only an LMCache server hand a request
over without any transport: the prefill engine (``kv_producer``, or ``kv_both`` with
``do_remote_decode``) saves at finish as above and returns ``kv_transfer_params`` ``{"kv_connector":
"lmcache", "remote_engine_id", "num_tokens", "block_size"}`` — ``num_tokens``: the leading prompt
tokens the server now holds — while holding nothing (the server has copies, so its blocks are freed
at once). The decode engine (``kv_consumer``) needs no address: its ordinary lookup finds those
blocks on the server and loads them before the request's first decode step, recomputing only the
prompt's last partial block and the first token. It never waits: the producer's ``put`` returns
after the server confirmed the blocks, before the prefill answers. A consumer never stores (what
it would add is its own generated tokens, at a copy per finished request). If the server lost the
blocks, decode recomputes them (``handoff_missed_tokens`` counts it, with a warning).

**Remote tier.** ``remote_url: lm://HOST:PORT`` (LMCache's scheme for its own server) is served by
``storage_tiers.remote_tier.RemoteTier`` rather than handed to LMCache: it stores our blocks under
our hashes on the unmodified LMCache server, and fails soft (misses + a warning, reconnection when
the server returns). Any other ``remote_url`` scheme goes to LMCache untouched.

Extra config (``kv_connector_extra_config``): ``lmcache_config_file`` (LMCache's YAML) and/or LMCache
keys inline (``chunk_size``, ``local_cpu``, ``max_local_cpu_size`` [GB], ``local_disk``
(``file:///path``), ``max_local_disk_size`` [GB], ``remote_url``, ...; inline wins), plus our own
``remote_required`` (default true: no server at start is an error; false: start without it) and
``remote_retry_interval_s`` (1.0). LMCache's usage telemetry (a report to its vendor's server from
every engine) is off unless ``LMCACHE_TRACK_USAGE`` is set in the environment.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_connector.base import KVConnectorBase, KVConnectorRole, KVTransferConfig, full_computed_blocks
from storage_tiers.base import StorageTierError
from storage_tiers.metrics import LatencyMetrics

logger = logging.getLogger(__name__)

_OUR_KEYS = ("lmcache_config_file", "remote_required", "remote_retry_interval_s")


def fold_hash(block_hash: bytes) -> int:
    """Our block hash → LMCache's int chunk hash (as ``lmcache.v1.token_database`` folds bytes)."""
    return int.from_bytes(block_hash[:8], "big")


class _HashedPrompt(list):
    """Token positions ``[0, n)`` for ``LMCacheEngine.retrieve``, carrying the chunk hashes that
    name them so no token is hashed."""

    chunk_hashes: list[int]


@dataclass
class LMCacheLoad:
    request_id: str
    block_ids: list[int]  # all of the request's blocks
    first_block: int  # blocks before this are the prefix cache's: never written
    lmcache_tokens: int  # tokens [0, lmcache_tokens) come from LMCache (chunk aligned)
    chunk_hashes: list[int]  # hashes of chunks [0, lmcache_tokens / chunk_size)
    first_chunk: int
    remote_first: int = 0  # block index of remote_buffers[0]
    remote_keys: list[bytes] = field(default_factory=list)
    remote_buffers: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LMCacheMeta:
    loads: list[LMCacheLoad] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loads)


def _lmcache_config(extra: dict[str, Any], block_size: int) -> Any:
    import yaml
    from lmcache.v1.config import LMCacheEngineConfig

    merged: dict[str, Any] = {}
    if extra.get("lmcache_config_file"):
        with open(extra["lmcache_config_file"]) as f:
            merged.update(yaml.safe_load(f) or {})
    merged.update({k: v for k, v in extra.items() if k not in _OUR_KEYS})
    merged.setdefault("chunk_size", block_size)
    merged.setdefault("max_local_cpu_size", 1.0)  # GB; LMCache's 5 GB default is allocated up front
    return LMCacheEngineConfig.from_dict(merged)


def _make_lmcache_classes() -> tuple[type, type]:
    """Subclasses of LMCache's interfaces, built on first use so importing this module needs no lmcache."""
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
    from lmcache.v1.token_database import ChunkedTokenDatabase

    class BlockHashDatabase(ChunkedTokenDatabase):
        def process_tokens(self, tokens=None, hashes=None, offsets=None, mask=None, make_key=True,
                           request_configs=None):
            chunk_hashes = getattr(tokens, "chunk_hashes", None)
            if chunk_hashes is None:
                yield from super().process_tokens(tokens, hashes, offsets, mask, make_key, request_configs)
                return
            skip = 0 if mask is None else int(mask.numel() - mask.long().sum().item())
            cs = self.chunk_size
            for c, h in enumerate(chunk_hashes):
                if c * cs >= skip:
                    yield c * cs, (c + 1) * cs, self._make_key_by_hash(h, request_configs) if make_key else h

    class BlockMajorKV(GPUConnectorInterface):
        def __init__(self, kv_cache: torch.Tensor, block_size: int) -> None:
            self.kv_cache = kv_cache
            self.block_size = block_size
            _, self.num_layers, _, _, self.heads, self.head_dim = kv_cache.shape

        def get_shape(self, num_tokens: int) -> torch.Size:
            return torch.Size([2, self.num_layers, num_tokens, self.heads * self.head_dim])

        def from_gpu(self, memory_obj, start, end, **kw):
            self.batched_from_gpu([memory_obj], [start], [end], **kw)

        def to_gpu(self, memory_obj, start, end, **kw):
            self.batched_to_gpu([memory_obj], [start], [end], **kw)

        def _sync(self) -> None:
            # LMCache hands the memory objects to its backends (save) or frees them (load) as soon as
            # we return, so the asynchronous copies into or out of pinned memory must be done.
            if self.kv_cache.device.type == "cuda":
                torch.cuda.current_stream(self.kv_cache.device).synchronize()

        def batched_from_gpu(self, memory_objs, starts, ends, **kw):
            dev = self.kv_cache.device
            ids = torch.tensor(kw["block_ids"], device=dev)  # one upload for every chunk
            bs, on_gpu = self.block_size, dev.type == "cuda"
            for m, s, e in zip(memory_objs, starts, ends):
                src = self.kv_cache.index_select(0, ids[s // bs:e // bs])  # [k, L, 2, bs, H, D]
                # KV_2LTD with the token axis split by block: [2, L, k, bs, H, D]. The permute runs on
                # the cache's device, then one DMA fills the (pinned) memory object.
                dst = m.tensor.view(2, self.num_layers, (e - s) // bs, bs, self.heads, self.head_dim)
                dst.copy_(src.permute(2, 1, 0, 3, 4, 5), non_blocking=on_gpu)
            self._sync()

        def batched_to_gpu(self, memory_objs, starts, ends, **kw):
            dev = self.kv_cache.device
            block_ids, first_block = kw["block_ids"], kw.get("first_block", 0)
            ids = torch.tensor(block_ids, device=dev)
            bs, on_gpu = self.block_size, dev.type == "cuda"
            for m, s, e in zip(memory_objs, starts, ends):
                k = (e - s) // bs
                skip = max(0, first_block - s // bs)  # blocks the prefix cache already had
                if skip >= k:
                    continue
                # The contiguous chunk goes to the device in one DMA and is permuted there: permuting
                # on the host first would cost a host copy and a pageable (synchronous) upload.
                src = m.tensor.to(dev, non_blocking=on_gpu).view(2, self.num_layers, k, bs, self.heads, self.head_dim)
                self.kv_cache.index_copy_(0, ids[s // bs + skip:e // bs], src.permute(2, 1, 0, 3, 4, 5)[skip:])
            self._sync()

        def initialize_kvcaches_ptr(self, **kwargs):
            pass

    return BlockHashDatabase, BlockMajorKV


def _continues_elsewhere(request: Any) -> bool:
    """A prefill that stopped for length (its max_tokens=1) with ``do_remote_decode``: one that hit
    EOS or a stop string is complete, and nobody comes for an aborted one."""
    if getattr(getattr(request, "status", None), "finish_reason", "length") != "length":
        return False
    return bool((request.kv_transfer_params or {}).get("do_remote_decode"))


class LMCacheConnector(KVConnectorBase):
    name = "lmcache"

    def __init__(self, config: KVTransferConfig, registry: Any = None) -> None:
        super().__init__(config)
        self.extra = dict(config.kv_connector_extra_config)
        self.engine: Any = None
        self.remote: Any = None
        self.kv_cache: torch.Tensor | None = None
        self.block_size = self.chunk_size = 0
        self._blocks: torch.Tensor | None = None
        self._matches: dict[str, LMCacheLoad] = {}  # matched, not yet allocated
        self._loads: dict[str, LMCacheLoad] = {}  # allocated, not yet copied
        self.latency = LatencyMetrics(registry)
        self._counters = dict(lookups=0, hit_tokens=0, lmcache_hit_tokens=0, remote_hit_tokens=0,
                              loaded_blocks=0, stored_chunks=0, remote_saved_blocks=0, load_shortfalls=0,
                              handoffs_sent=0, handoffs_received=0, handoff_missed_tokens=0)
        self._counted: set[str] = set()  # requests whose lookup is in the counters, until they finish
        self._closed = False

    # ---- worker half: setup -------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, layout: dict[str, Any]) -> None:
        # LMCache 0.5 posts usage telemetry to its vendor's server from every new engine unless told
        # not to; a serving system must not phone home behind its operator's back, so it is off
        # unless LMCACHE_TRACK_USAGE is set explicitly.
        os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
        from lmcache.v1.cache_engine import LMCacheEngine
        from lmcache.v1.metadata import LMCacheMetadata

        expect = (layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
        if tuple(kv_cache.shape[1:]) != expect or not kv_cache.is_contiguous():
            raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} is not a contiguous [num_blocks, *{expect}]")
        self.kv_cache, self.block_size = kv_cache, int(layout["block_size"])
        self._blocks = kv_cache.view(kv_cache.shape[0], -1).view(torch.uint8)
        cfg = _lmcache_config(self.extra, self.block_size)
        if cfg.chunk_size % self.block_size:
            raise ValueError(f"LMCache chunk_size {cfg.chunk_size} must be a multiple of block_size {self.block_size}")
        self.chunk_size = int(cfg.chunk_size)
        remote_url = cfg.remote_url
        if remote_url and remote_url.startswith("lm://"):
            from storage_tiers.remote_tier import RemoteTier

            cfg.remote_url = None
            retry_s = float(self.extra.get("remote_retry_interval_s", 1.0))
            try:
                self.remote = RemoteTier.from_url(remote_url, self._blocks.shape[1], retry_interval_s=retry_s,
                                                  required=bool(self.extra.get("remote_required", True)))
            except StorageTierError as e:
                # The tier's advice names its own argument; a user of this connector sets these keys.
                address = remote_url[len("lm://"):].rstrip("/")
                raise StorageTierError(
                    f"lmcache connector: no LMCache server at {address} (remote_url). Start one "
                    f"(`python -m storage_tiers.lmcache_server HOST PORT`, or an `lmcache_server` section in the "
                    f"kvfabric config and `kvfabric up` starts it), or set remote_required: false to serve "
                    f"without the remote tier until it appears") from e
        if self.role != KVConnectorRole.BOTH and self.remote is None:
            logger.warning("lmcache connector as %s without an lm:// remote_url: prefill and decode share only what "
                           "LMCache's own backends share, so decode may recompute the prompt", self.role.value)
        L, _, _, H, D = expect
        metadata = LMCacheMetadata(model_name="kvfabric", world_size=1, local_world_size=1, worker_id=0,
                                   local_worker_id=0, kv_dtype=kv_cache.dtype,
                                   kv_shape=(L, 2, self.chunk_size, H, D), chunk_size=self.chunk_size,
                                   engine_id=self.engine_id)
        db_cls, conn_cls = _make_lmcache_classes()
        self.engine = LMCacheEngine(cfg, metadata, db_cls(cfg, metadata), conn_cls(kv_cache, self.block_size),
                                    None, None)
        self.engine.post_init()

    # ---- scheduler half -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        rid = request.request_id
        self._drop(self._matches.pop(rid, None))  # asked again: its allocation failed last time
        if self.engine is None or num_computed_tokens % self.block_size:
            return 0, False
        bs, cs = self.block_size, self.chunk_size
        k = cs // bs
        num_tokens = getattr(request, "num_tokens", len(request.prompt_token_ids))
        last_block = min(len(request.block_hashes), (num_tokens - 1) // bs)  # >= 1 token left to compute
        first_block = num_computed_tokens // bs
        # A request asked again (its allocation failed, or it was preempted) is counted once.
        first_ask = rid not in self._counted
        self._counted.add(rid)
        self._counters["lookups"] += first_ask
        if last_block <= first_block:
            if first_ask:
                self._check_handoff(request, num_computed_tokens)
            return 0, False
        hashes = request.block_hashes
        last_chunk = last_block // k
        chunk_hashes = [fold_hash(hashes[(c + 1) * k - 1]) for c in range(last_chunk)]
        first_chunk = first_block // k
        lm_tokens = 0
        if last_chunk > first_chunk:
            found = self.engine.lookup(hashes=chunk_hashes[first_chunk:], offsets=[cs] * (last_chunk - first_chunk),
                                       lookup_id=rid, pin=True)
            lm_tokens = first_chunk * cs + found if found else 0
        load = LMCacheLoad(rid, [], first_block, lm_tokens, chunk_hashes[:lm_tokens // cs], first_chunk)
        got = max(first_block, lm_tokens // bs)  # blocks covered so far
        if self.remote is not None and got < last_block:
            keys = list(hashes[got:last_block])
            n = self.remote.count_prefix(keys)
            bufs = self.remote.get(keys[:n]) if n else []
            n = next((i for i, b in enumerate(bufs) if b is None), len(bufs))  # the server died in between
            if n:
                load.remote_first, load.remote_keys, load.remote_buffers = got, keys[:n], bufs[:n]
                self._counters["remote_hit_tokens"] += n * bs if first_ask else 0
                got += n
        if first_ask:
            self._check_handoff(request, got * bs)
        if got <= first_block:
            self._drop(load)
            return 0, False
        self._matches[rid] = load
        if first_ask:
            self._counters["lmcache_hit_tokens"] += max(0, lm_tokens - num_computed_tokens)
            self._counters["hit_tokens"] += got * bs - num_computed_tokens
        return got * bs - num_computed_tokens, False

    def _check_handoff(self, request: Any, found_tokens: int) -> None:
        """A request prefilled by an ``lmcache`` producer: did we find what it stored?"""
        params = request.kv_transfer_params or {}
        if self.role == KVConnectorRole.PRODUCER or params.get("kv_connector") != self.name:
            return
        self._counters["handoffs_received"] += 1
        missed = int(params.get("num_tokens", 0)) - found_tokens
        if missed > 0:
            self._counters["handoff_missed_tokens"] += missed
            logger.warning("request %s: the prefill stored %d prompt tokens, %d are not found here: recomputing them "
                           "(the LMCache server lost them, or the two engines use different servers or block sizes)",
                           request.request_id, params.get("num_tokens"), missed)

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        load = self._matches.pop(request.request_id, None)
        if load is None:
            return
        need = load.first_block + num_external_tokens // self.block_size
        if num_external_tokens == 0 or len(block_ids) < need:
            if num_external_tokens:
                logger.error("request %s: %d blocks allocated, the LMCache load needs %d: not loading",
                             request.request_id, len(block_ids), need)
            self._drop(load)
            return
        load.block_ids = list(block_ids)
        self._loads[request.request_id] = load

    def build_connector_meta(self, scheduled: dict[str, int]) -> LMCacheMeta:
        return LMCacheMeta(list(self._loads.values()))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._counted.discard(rid)
        self._drop(self._matches.pop(rid, None))
        self._drop(self._loads.pop(rid, None))
        if self.engine is None or not block_ids or self.role == KVConnectorRole.CONSUMER:
            return False, None
        hashes, ids = full_computed_blocks(request, block_ids, self.block_size)
        shared = 0
        if hashes:
            t0 = time.perf_counter()
            shared = self._save(hashes, ids, rid)
            self.latency.observe("save", time.perf_counter() - t0)
        if not _continues_elsewhere(request):
            return False, None
        # Nothing is held: the decode engine reads the server's copies, so these blocks are free now.
        self._counters["handoffs_sent"] += 1
        return False, {"kv_connector": self.name, "remote_engine_id": self.engine_id,
                       "num_tokens": shared * self.block_size, "block_size": self.block_size}

    def _save(self, hashes: list[bytes], block_ids: list[int], rid: str) -> int:
        """Store what LMCache and the remote tier lack; returns how many leading blocks the remote
        tier holds now (0 without one)."""
        k = self.chunk_size // self.block_size
        num_chunks = len(hashes) // k
        if num_chunks:
            chunk_hashes = [fold_hash(hashes[(c + 1) * k - 1]) for c in range(num_chunks)]
            offsets = [self.chunk_size] * num_chunks
            held = self.engine.lookup(hashes=chunk_hashes, offsets=offsets) // self.chunk_size
            if held < num_chunks:
                # LMCache's lookup is a prefix count, so the held chunks are [0, held): store the rest.
                # With hashes= LMCache numbers the given chunks' tokens from 0, hence the sliced ids.
                self.engine.store(hashes=chunk_hashes[held:], offsets=offsets[held:], slot_mapping=[],
                                  block_ids=block_ids[held * k:num_chunks * k], req_id=rid)
                self._counters["stored_chunks"] += num_chunks - held
        if self.remote is None:
            return 0
        held = self.remote.contains(hashes)
        missing = [i for i, h in enumerate(held) if not h]
        if missing and self.remote.connected:
            rows = self._blocks.index_select(0, torch.tensor([block_ids[i] for i in missing],
                                                             device=self._blocks.device)).cpu()
            if self.remote.put([hashes[i] for i in missing], rows):
                self._counters["remote_saved_blocks"] += len(missing)
                for i in missing:
                    held[i] = True
        return next((i for i, h in enumerate(held) if not h), len(held))

    # ---- worker half: loads --------------------------------------------------------------------

    def start_load_kv(self, meta: LMCacheMeta | None) -> None:
        for load in meta.loads if meta else ():
            if self._loads.get(load.request_id) is not load:
                continue  # aborted or finished since the meta was built
            del self._loads[load.request_id]
            t0 = time.perf_counter()
            try:
                self._load(load)
            finally:
                self._drop(load)
            self.latency.observe("load", time.perf_counter() - t0)

    def _load(self, load: LMCacheLoad) -> None:
        bs, cs = self.block_size, self.chunk_size
        if load.chunk_hashes:
            prompt = _HashedPrompt(range(load.lmcache_tokens))
            prompt.chunk_hashes = load.chunk_hashes
            mask = torch.ones(load.lmcache_tokens, dtype=torch.bool)
            mask[:load.first_chunk * cs] = False
            got = int(self.engine.retrieve(prompt, mask, block_ids=load.block_ids, first_block=load.first_block,
                                           req_id=load.request_id).sum())
            want = load.lmcache_tokens - load.first_chunk * cs
            if got < want:
                # Pinned at lookup, so only a failing LMCache backend gets here; the engine will read
                # whatever the blocks hold, so say so loudly.
                self._counters["load_shortfalls"] += 1
                logger.error("request %s: LMCache retrieved %d of %d promised tokens", load.request_id, got, want)
            self._counters["loaded_blocks"] += (load.lmcache_tokens // bs) - max(load.first_block,
                                                                                 load.first_chunk * cs // bs)
        if load.remote_buffers:
            ids = load.block_ids[load.remote_first:load.remote_first + len(load.remote_buffers)]
            src = torch.stack(load.remote_buffers).to(self._blocks.device)
            self._blocks.index_copy_(0, torch.tensor(ids, device=self._blocks.device), src)
            self._counters["loaded_blocks"] += len(ids)

    def _drop(self, load: LMCacheLoad | None) -> None:
        if load is not None and self.engine is not None:
            self.engine.lookup_unpin(load.request_id)
            load.remote_buffers = []

    def get_finished(self) -> tuple[set[str], set[str], dict[str, str]]:
        return set(), set(), {}

    def abort(self, request_id: str) -> None:
        self._drop(self._matches.pop(request_id, None))
        self._drop(self._loads.pop(request_id, None))

    def stats(self) -> dict[str, Any]:
        return {"connector": self.name, "role": self.role.value, **self._counters,
                "loads_pending": len(self._loads), "chunk_size": self.chunk_size, **self.latency.snapshot(),
                "remote": self.remote.stats() if self.remote is not None else {}}

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for rid in list(self._matches) + list(self._loads):
            self.abort(rid)
        if self.engine is not None:
            self.engine.close()
        if self.remote is not None:
            self.remote.close()
