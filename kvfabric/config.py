"""The one configuration file (YAML) for a whole topology, and how flags override it.

Sections: ``model``/``dtype``/``device`` at the top; ``engine`` (EngineConfig fields shared by
every engine); ``proxy``; ``prefill`` and ``decode`` (instances, ports); ``kv_transfer_config``
(vLLM-style: ``kv_connector`` and ``kv_connector_extra_config``); ``tiers`` (storage tiers);
``kv_events_config`` (vLLM's: KV-cache events for the proxy's prefix-aware routing);
``lmcache_server`` (optional: LMCache's standalone server, which ``kvfabric up`` then starts and
points every ``lmcache`` connector at). Unknown keys are an error naming them, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from proxy.config import DisaggregationConfig


@dataclass
class EngineSection:
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None
    # Fraction of the GPU's total memory each engine may use (weights, activations, KV cache).
    # None: 0.9 for an engine alone on its GPU, 0.9 split evenly among engines sharing one.
    gpu_memory_utilization: float | None = None
    kv_cache_bytes: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False
    fused_kernels: bool = True


@dataclass
class ProxySection:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    health_interval_s: float = 5.0  # how often the proxy checks each engine
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)  # proxy/adaptive.py
    routing_policy: str = "least_load"  # round_robin | least_load | prefix (needs kv_events_config)
    prefix_weight: float = 2.0
    load_weight: float = 1.0
    session_header: str = "x-session-id"
    max_body_bytes: int = 8 << 20  # larger request bodies get a 413 (0: no limit)
    max_concurrent_per_key: int = 0  # in-flight requests per API key before a 429 (0: no limit)
    max_queued_prompt_tokens: int = 0  # prompt tokens of unfinished requests before a 429 (0: no limit)


@dataclass
class RoleSection:
    instances: int = 1
    host: str = "127.0.0.1"  # services bind to loopback unless told otherwise
    ports: list[int] = field(default_factory=list)  # empty: chosen free at start-up
    dcp_size: int = 1
    gpus: str | None = None  # `kvfabric up`: GPU ids for this role's engines ("0", "1,2"); None: laid out in turn
    gpu_memory_utilization: float | None = None  # this role's engines; None: the engine section's


@dataclass
class LMCacheServerSection:
    host: str = "127.0.0.1"  # where it listens, and where the engines reach it
    port: int = 0  # 0: a free port chosen at start-up; fix it to share the server with other hosts
    start: bool = True  # false: it runs elsewhere (another host, a compose service); only point at it

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"lmcache_server.port {self.port} is not a TCP port")
        if not self.start and not self.port:
            raise ValueError("lmcache_server: a server that is not started here needs its port (start: false, port: 0)")

    @property
    def reach_host(self) -> str:
        # A server bound to every interface is reached on loopback by the engines `up` starts beside it.
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def url(self) -> str:
        return f"lm://{self.reach_host}:{self.port}"


@dataclass
class KVFabricConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    engine: EngineSection = field(default_factory=EngineSection)
    proxy: ProxySection = field(default_factory=ProxySection)
    prefill: RoleSection = field(default_factory=RoleSection)
    decode: RoleSection = field(default_factory=RoleSection)
    # auto: the transport follows the topology (kv_connector/auto.py); lease_s: how long prefill
    # holds a request's blocks without a renewal from decode; kv_load_failure_policy: what decode
    # does when a load fails; max_held_fraction: prefill's cache share that unread blocks may fill.
    kv_transfer_config: dict[str, Any] = field(default_factory=lambda: {
        "kv_connector": "auto", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"lease_s": 30.0, "max_held_fraction": 0.5}})
    tiers: dict[str, Any] = field(default_factory=dict)
    # vLLM's kv_events_config (engine/kv_events.py): each engine publishes its prefix cache's
    # stores and evictions; the proxy's `prefix` routing policy follows them. None: no events.
    kv_events_config: dict[str, Any] | None = None
    # Absent (None) unless configured: without it nothing starts and no connector is touched.
    lmcache_server: LMCacheServerSection | None = field(default=None, metadata={"section": LMCacheServerSection})

    @classmethod
    def load(cls, path: str | Path | None) -> "KVFabricConfig":
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping at the top level")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "KVFabricConfig":
        return _build(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(kind: type, data: dict[str, Any], where: str):
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        section = type(default) if hasattr(default, "__dataclass_fields__") else known[name].metadata.get("section")
        if section is not None and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{name}: expected a mapping")
            value = _build(section, value, f"{where}.{name}")
        values[name] = value
    return kind(**values)
