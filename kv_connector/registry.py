"""Connector name → implementation, so swapping transports is a config change, never a code change.

Each built-in name maps to ``"module:Class"`` and is imported only when asked for: a deployment
that never names ``nixl`` never imports its (optional, heavy) dependencies.
"""

from __future__ import annotations

import importlib
from typing import Callable, Union

from kv_connector.base import KVConnectorBase, KVTransferConfig

Factory = Callable[[KVTransferConfig], KVConnectorBase]

_FACTORIES: dict[str, Union[str, Factory]] = {
    "zmq": "kv_connector.zmq_connector:ZmqConnector",
    "inproc": "kv_connector.inproc_connector:InprocConnector",
    "tiered": "kv_connector.tiered_connector:TieredConnector",
    "multi": "kv_connector.multi_connector:MultiConnector",
    "nixl": "kv_connector.nixl_connector:NixlConnector",
    "ucx": "kv_connector.ucx_connector:UcxConnector",
    "ipc": "kv_connector.ipc_connector:IpcConnector",
    "lmcache": "kv_connector.lmcache_connector:LMCacheConnector",
}


def register_connector(name: str, factory: Union[str, Factory]) -> None:
    """``factory``: a callable taking a KVTransferConfig, or a lazy ``"module:attr"`` path to one."""
    if name in _FACTORIES:
        raise ValueError(f"kv_connector {name!r} is already registered")
    _FACTORIES[name] = factory


def known_connectors() -> list[str]:
    return sorted(_FACTORIES)


def create_connector(config: KVTransferConfig) -> KVConnectorBase:
    factory = _FACTORIES.get(config.kv_connector)
    if factory is None and config.kv_connector == "auto":
        raise ValueError("kv_connector 'auto' names no connector by itself: kvfabric up/serve resolve it by "
                         "topology (kv_connector.auto.resolve_auto); name one here")
    if factory is None:
        raise ValueError(f"unknown kv_connector {config.kv_connector!r}; known: {', '.join(known_connectors())}")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(config)
