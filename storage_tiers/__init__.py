"""storage_tiers: where KV-cache blocks live when they are not in the engine's cache.

Owns the tier interface (``StorageTier``: contains / get / put / release, a byte capacity,
eviction, stats), the CPU-RAM tier (a preallocated, pinned-when-CUDA pool of block slots, LRU,
pinned slots never evicted), the disk tier (one checksummed file per block, written behind the
request by a small thread pool, renamed into place atomically, LRU within a byte cap, index
rebuilt from the files at start-up), the hierarchy that orders them (CPU first; CPU evictions
are demoted to disk, disk hits promoted to CPU) and their Prometheus metrics.

A block is opaque bytes named by its chained prefix hash (``bytes``); nothing here knows about
models, requests or layouts. Imports nothing else of kvfabric: connectors (``kv_connector``)
build on it, never the other way round.
"""

from storage_tiers.base import StorageTier, StorageTierError
from storage_tiers.cpu_tier import CpuTier
from storage_tiers.disk_tier import DiskTier
from storage_tiers.hierarchy import TierHierarchy, parse_bytes

__all__ = ["StorageTier", "StorageTierError", "CpuTier", "DiskTier", "TierHierarchy", "parse_bytes"]
