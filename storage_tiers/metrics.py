"""Tier counters, twice: plain numbers for ``stats()`` (services report JSON to the proxy) and
Prometheus series for scraping.

Prometheus names (label ``tier``: ``cpu`` | ``disk``): ``kvfabric_tier_hits_total``,
``kvfabric_tier_misses_total``, ``kvfabric_tier_bytes_in_total`` (bytes stored into the tier),
``kvfabric_tier_bytes_out_total`` (bytes read out of it), ``kvfabric_tier_evictions_total``;
histograms ``kvfabric_tier_load_seconds`` and ``kvfabric_tier_save_seconds`` (one observation
per connector load or save, whatever tiers served it). A metric name can be registered once per
registry, so the families are made once per registry and shared by every tier in the process:
two engines in one process add into the same series.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

_COUNTERS = {  # plain name -> help text
    "hits": "block lookups served by this tier",
    "misses": "block lookups this tier could not serve",
    "bytes_in": "bytes stored into this tier",
    "bytes_out": "bytes read out of this tier",
    "evictions": "blocks evicted from this tier",
}
# Block loads and saves: ~10 µs (a CPU hit of a small block) to seconds (many blocks from disk).
_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)

_families: dict[int, tuple[CollectorRegistry, dict[str, Any]]] = {}
_families_lock = threading.Lock()


def _families_for(registry: CollectorRegistry | None) -> dict[str, Any]:
    registry = REGISTRY if registry is None else registry
    with _families_lock:
        entry = _families.get(id(registry))
        if entry is None or entry[0] is not registry:
            fams: dict[str, Any] = {
                name: Counter(f"kvfabric_tier_{name}_total", text, ["tier"], registry=registry)
                for name, text in _COUNTERS.items()
            }
            fams["load"] = Histogram("kvfabric_tier_load_seconds", "one connector load from the tiers",
                                     buckets=_BUCKETS, registry=registry)
            fams["save"] = Histogram("kvfabric_tier_save_seconds", "one connector save into the tiers",
                                     buckets=_BUCKETS, registry=registry)
            entry = _families[id(registry)] = (registry, fams)
        return entry[1]


class TierMetrics:
    """One tier's counters. Thread-safe: disk writer threads count too."""

    def __init__(self, tier: str, registry: CollectorRegistry | None = None) -> None:
        self.tier = tier
        fams = _families_for(registry)
        self._prom = {name: fams[name].labels(tier=tier) for name in _COUNTERS}
        self._lock = threading.Lock()
        self._plain = {name: 0 for name in _COUNTERS}

    def add(self, name: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self._plain[name] += n
        self._prom[name].inc(n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._plain)


class LatencyMetrics:
    """Load and save latency of whoever drives the tiers (a connector): histograms plus plain sums."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        fams = _families_for(registry)
        self._hist = {"load": fams["load"], "save": fams["save"]}
        self._lock = threading.Lock()
        self._plain: dict[str, float] = {"loads": 0, "load_seconds_total": 0.0, "load_seconds_max": 0.0,
                                         "saves": 0, "save_seconds_total": 0.0, "save_seconds_max": 0.0}

    def observe(self, kind: str, seconds: float) -> None:
        """``kind``: ``load`` | ``save``."""
        self._hist[kind].observe(seconds)
        with self._lock:
            self._plain[f"{kind}s"] += 1
            self._plain[f"{kind}_seconds_total"] += seconds
            self._plain[f"{kind}_seconds_max"] = max(self._plain[f"{kind}_seconds_max"], seconds)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._plain)
