"""The connector interface the engine calls, and the config that picks an implementation.

One connector object per engine holds both halves, because one engine is one process:

- the **scheduler half** decides: how many prompt tokens can come from outside
  (``get_num_new_matched_tokens``), which local blocks receive them (``update_state_after_alloc``),
  what the worker half must do this step (``build_connector_meta``), and whether a finished
  request's blocks must stay allocated for an asynchronous send (``request_finished``);
- the **worker half** moves bytes: ``start_load_kv`` (never blocks), ``save_kv`` (after the
  forward), and ``get_finished``, which the scheduler polls once per step to learn which sends
  completed (blocks may be freed) and which loads completed or failed (the request may run, or
  must end with the error).

The engine hands requests in duck-typed (``request_id``, ``prompt_token_ids``,
``num_computed_tokens``, ``kv_transfer_params``, ``block_hashes``); nothing here imports ``engine``.
"""

from __future__ import annotations

import enum
import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any

import torch


LOAD_FAILURE_POLICIES = ("recompute", "fail")


class KVConnectorRole(enum.Enum):
    PRODUCER = "kv_producer"  # computes prefills and holds their blocks until a consumer pulls them
    CONSUMER = "kv_consumer"  # pulls blocks named by a request's kv_transfer_params, then decodes
    BOTH = "kv_both"  # either, per request (vLLM's do_remote_decode / remote_block_ids)


@dataclass
class KVTransferConfig:
    """vLLM's ``--kv-transfer-config`` shape, minus what a single-GPU-per-engine system never needs."""

    kv_connector: str
    kv_role: str = "kv_both"
    kv_ip: str = "127.0.0.1"  # a producer binds here; 0.0.0.0 needs extra config "advertise_host"
    kv_port: int = 0  # 0: an ephemeral port, reported in each request's kv_transfer_params
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # vLLM's knob: a consumer whose load failed (expired, producer gone, short or bad read)
    # "recompute"s the prompt itself and the request goes on; "fail" ends it with the error.
    kv_load_failure_policy: str = "recompute"

    def __post_init__(self) -> None:
        roles = [r.value for r in KVConnectorRole]
        if self.kv_role not in roles:
            raise ValueError(f"kv_role {self.kv_role!r} is not one of {roles}")
        if self.kv_load_failure_policy not in LOAD_FAILURE_POLICIES:
            raise ValueError(f"kv_load_failure_policy {self.kv_load_failure_policy!r} is not one of "
                             f"{list(LOAD_FAILURE_POLICIES)}")
        if not isinstance(self.kv_connector_extra_config, dict):
            raise ValueError("kv_connector_extra_config must be a mapping")
        self.kv_port = int(self.kv_port)

    @property
    def role(self) -> KVConnectorRole:
        return KVConnectorRole(self.kv_role)

    def extra(self, key: str, default: Any) -> Any:
        return self.kv_connector_extra_config.get(key, default)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVTransferConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown kv_transfer_config keys {unknown}; known: {sorted(known)}")
        if "kv_connector" not in d:
            raise ValueError("kv_transfer_config needs 'kv_connector'")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> KVTransferConfig:
        """JSON, or YAML (a superset) for config files and hand-typed flags."""
        try:
            d = json.loads(s)
        except json.JSONDecodeError:
            import yaml

            d = yaml.safe_load(s)
        if not isinstance(d, dict):
            raise ValueError(f"kv_transfer_config must be a mapping, got {type(d).__name__}")
        return cls.from_dict(d)


class KVConnectorBase(ABC):
    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self.role = config.role
        self.engine_id = config.engine_id
        self.kv_load_failure_policy = config.kv_load_failure_policy

    # ---- scheduler half ----------------------------------------------------------------------

    def request_added(self, request: Any) -> None:
        """The engine queued ``request`` (before it is ever scheduled): a consumer starts keeping
        the producer's hold on its blocks alive here (kv_connector/lease.py)."""

    def held_block_budget(self, num_blocks: int) -> int | None:
        """How many blocks finished requests may hold for consumers before the scheduler admits no
        new prompt (backpressure); None: no limit."""
        return None

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """(prompt tokens beyond ``num_computed_tokens`` this connector can supply, load is async).

        May be called again for the same request when its allocation failed: no side effects
        beyond remembering the answer.
        """

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        """``block_ids``: all of the request's blocks, local prefix hits first."""

    @abstractmethod
    def build_connector_meta(self, scheduled: dict[str, int]) -> Any:
        """Per step: what the worker half must do. ``scheduled`` = {request_id: num_new_tokens}."""

    @abstractmethod
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """(keep the blocks until ``get_finished`` reports the send done?, kv_transfer_params)."""

    def on_block_evicted(self, block_hash: bytes, block_id: int) -> None:
        """The engine's prefix cache is about to reuse ``block_id``, a cached full block named
        ``block_hash``, for other tokens. A connector that keeps blocks (``tiered``) copies it out
        before returning; the default keeps nothing."""

    # ---- worker half ---------------------------------------------------------------------------

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor | None:
        """Zeroed memory for the engine's KV cache when this connector needs it somewhere special
        (``ipc``: a host cache in shared memory that consumers map); None: the engine allocates it."""
        return None

    @abstractmethod
    def register_kv_cache(self, kv_cache: torch.Tensor, layout: dict[str, Any]) -> None:
        """``kv_cache``: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim];
        ``layout``: block_size, num_layers, num_kv_heads, head_dim, dtype (str), model_id."""

    @abstractmethod
    def start_load_kv(self, meta: Any) -> None:
        """Start this step's loads; never blocks on the network."""

    def save_kv(self, meta: Any) -> None:
        """After the step's forward. Transfer connectors serve from held blocks and need nothing."""

    @abstractmethod
    def get_finished(self) -> tuple[set[str], set[str], dict[str, str]]:
        """(finished_sending: producer may free, finished_recving: consumer may run,
        failed_recving: {request_id: why}). Each id is reported once."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Cancel the request's load; once this returns no byte is written into its blocks, and
        the producer has been told to release its held blocks."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters: bytes_sent, bytes_received, transfers, held_requests, held_blocks, failures..."""

    @abstractmethod
    def shutdown(self) -> None:
        """Close every thread and socket; idempotent."""


def full_computed_blocks(request: Any, block_ids: list[int], block_size: int) -> tuple[list[bytes], list[int]]:
    """(hashes, block ids) of a request's leading blocks that are full and computed: what a store may keep."""
    n = min(len(request.block_hashes), int(request.num_computed_tokens) // block_size, len(block_ids))
    return list(request.block_hashes[:n]), list(block_ids[:n])
