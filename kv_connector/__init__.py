"""kv_connector: moves KV-cache blocks between engines (prefill → decode) behind one interface.

Owns the connector interface the engine calls (``KVConnectorBase``: a scheduler half and a worker
half), the config that picks an implementation (``KVTransferConfig``, vLLM's
``--kv-transfer-config`` shape), the name → implementation registry, and every transport:
``zmq`` (TCP, across processes and hosts) and ``inproc`` (two engines in one process, for tests).

Must not import ``engine``: requests and caches arrive duck-typed through the interface.
May import ``storage_tiers``.
"""

from kv_connector.base import KVConnectorBase, KVConnectorRole, KVTransferConfig
from kv_connector.registry import create_connector, known_connectors, register_connector

__all__ = ["KVConnectorBase", "KVConnectorRole", "KVTransferConfig", "create_connector", "known_connectors",
           "register_connector"]
