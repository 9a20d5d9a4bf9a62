"""Several connectors in a chain, as one: e.g. ``tiered`` (local prefix reuse) then ``zmq`` (the
rest of the prompt from a prefill engine).

- **match** — each connector in order is asked for the tokens after those the ones before it
  cover; the first one that answers asynchronously ends the chain (at most one load may be
  asynchronous: the engine has one flag per request). The answer is the sum.
- **allocate** — each connector gets all of the request's block ids and its own share of the
  external tokens (it knows where its share starts: it was asked with that offset). Connectors
  after the chain's end get 0, so they drop whatever a previous ask left behind.
- **finish** — every connector sees the request; its blocks are held while any of them holds
  them, and are reported sent only once every holder has reported; ``kv_transfer_params`` come
  from the first that returns them.
- **everything else** fans out; ``stats`` nest by connector name.

Extra config: ``{"connectors": [{"kv_connector": "tiered", "kv_connector_extra_config": {...}},
{"kv_connector": "zmq", ...}]}`` — each entry a ``kv_transfer_config`` whose unspecified fields
(role, ip, port, engine id) are this one's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kv_connector.base import KVConnectorBase, KVTransferConfig
from kv_connector.registry import create_connector


@dataclass
class MultiMeta:
    metas: list[Any] = field(default_factory=list)  # one per connector, in order

    def __bool__(self) -> bool:
        return any(bool(m) for m in self.metas)


class MultiConnector(KVConnectorBase):
    name = "multi"

    def __init__(self, config: KVTransferConfig) -> None:
        super().__init__(config)
        specs = config.extra("connectors", None)
        if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
            raise ValueError("the multi connector needs kv_connector_extra_config "
                             "{'connectors': [{'kv_connector': NAME, ...}, ...]}")
        inherited = {"kv_role": config.kv_role, "kv_ip": config.kv_ip, "kv_port": config.kv_port,
                     "engine_id": config.engine_id}
        self.connectors: list[KVConnectorBase] = []
        self.names: list[str] = []
        try:
            for spec in specs:
                child = create_connector(KVTransferConfig.from_dict({**inherited, **spec}))
                self.connectors.append(child)
                name = spec["kv_connector"]
                self.names.append(name if name not in self.names else f"{name}#{len(self.names)}")
        except Exception:
            self.shutdown()
            raise
        self._shares: dict[str, list[int]] = {}  # request_id -> tokens each connector matched
        self._holders: dict[str, set[int]] = {}  # request_id -> connectors still holding its blocks
        self.kv_cache: torch.Tensor | None = None
        self._closed = False

    # ---- scheduler half -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        shares = [0] * len(self.connectors)
        total, load_async = 0, False
        for i, c in enumerate(self.connectors):
            n, is_async = c.get_num_new_matched_tokens(request, num_computed_tokens + total)
            shares[i] = n
            total += n
            if is_async:
                load_async = True
                break
        self._shares[request.request_id] = shares
        return total, load_async

    def request_added(self, request: Any) -> None:
        for c in self.connectors:
            c.request_added(request)

    def held_block_budget(self, num_blocks: int) -> int | None:
        budgets = [b for c in self.connectors if (b := c.held_block_budget(num_blocks)) is not None]
        return min(budgets) if budgets else None

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        shares = self._shares.pop(request.request_id, [0] * len(self.connectors))
        left = num_external_tokens
        for c, share in zip(self.connectors, shares):
            give = min(share, left)
            left -= give
            c.update_state_after_alloc(request, block_ids, give)

    def build_connector_meta(self, scheduled: dict[str, int]) -> MultiMeta:
        return MultiMeta([c.build_connector_meta(scheduled) for c in self.connectors])

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._shares.pop(rid, None)
        holders, params = set(), None
        for i, c in enumerate(self.connectors):
            hold, p = c.request_finished(request, block_ids)
            if hold:
                holders.add(i)
            if params is None and p is not None:
                params = p
        if holders:
            self._holders[rid] = holders
        return bool(holders), params

    def on_block_evicted(self, block_hash: bytes, block_id: int) -> None:
        for c in self.connectors:
            c.on_block_evicted(block_hash, block_id)

    # ---- worker half ----------------------------------------------------------------------------

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor | None:
        return next((t for c in self.connectors if (t := c.allocate_kv_cache(shape, dtype, device)) is not None),
                    None)

    def register_kv_cache(self, kv_cache: torch.Tensor, layout: dict[str, Any]) -> None:
        self.kv_cache = kv_cache
        for c in self.connectors:
            c.register_kv_cache(kv_cache, layout)

    def _metas(self, meta: MultiMeta | None) -> list[Any]:
        return meta.metas if meta is not None else [None] * len(self.connectors)

    def start_load_kv(self, meta: MultiMeta | None) -> None:
        for c, m in zip(self.connectors, self._metas(meta)):
            c.start_load_kv(m)

    def save_kv(self, meta: MultiMeta | None) -> None:
        for c, m in zip(self.connectors, self._metas(meta)):
            c.save_kv(m)

    def get_finished(self) -> tuple[set[str], set[str], dict[str, str]]:
        sent: set[str] = set()
        recved: set[str] = set()
        failed: dict[str, str] = {}
        for i, c in enumerate(self.connectors):
            s, r, f = c.get_finished()
            for rid in s:
                holders = self._holders.get(rid)
                if holders is None:
                    continue
                holders.discard(i)
                if not holders:
                    del self._holders[rid]
                    sent.add(rid)
            recved |= r
            for rid, why in f.items():
                failed.setdefault(rid, f"{self.names[i]}: {why}")
        return sent, recved - failed.keys(), failed

    def abort(self, request_id: str) -> None:
        self._shares.pop(request_id, None)
        for c in self.connectors:
            c.abort(request_id)

    def stats(self) -> dict[str, Any]:
        return {"connector": self.name, "role": self.role.value,
                "connectors": {name: c.stats() for name, c in zip(self.names, self.connectors)}}

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        errors = []
        for c in self.connectors:
            try:
                c.shutdown()
            except Exception as e:  # the others still close their threads and sockets
                errors.append(e)
        if errors:
            raise errors[0]
