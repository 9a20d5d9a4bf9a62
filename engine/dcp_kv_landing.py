"""Where the KV shipped from prefill lands on a decode-context-parallel engine: rank 0 pulls, then scatters.

The connector (any of them: the engine sees only its interface) lives on rank 0 and is
registered with a host **staging** cache instead of the device cache. A request waiting for
remote KV gets, besides its rounds in the engine's pool, one staging block per block to load;
the connector writes the prompt's blocks there, exactly as it would on one rank. When it
reports the load finished, each staged block goes to the rank that owns it — global block
``k`` to rank ``k % N``, local block id ``rounds[k // N]`` (engine/attention/dcp_backend.py) —
in one ``write_blocks`` before ``get_finished`` returns, so the request runs only once every
rank holds its share. Staging blocks are freed then, or when the load fails or is aborted.

Why this and not a pull per rank: a pull connector's hand-off is one contiguous range per
request, released by the consumer's ``done``; N ranks pulling strided blocks of one hold would
need N ranges and N releases of the same hold — a protocol change in every transport. Here the
connectors stay untouched, the bytes cross the network once, and the price is a copy through
rank 0 (host → each owner's device) that a long prompt's transfer dominates anyway.

The staging cache is a plain host tensor of ``num_staging_blocks`` (default: one request of
``max_model_len``), never touched until written, so its pages cost nothing while unused; a load
that finds it full fails with a clear error. A DCP engine only consumes: it never holds its
blocks for a send, and evicted rounds are not offered to tiers (their hashes cover N blocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from engine.dcp_runner import DCPModelRunner
    from kv_connector.base import KVConnectorBase


class DCPKVLanding:
    def __init__(self, inner: KVConnectorBase, runner: DCPModelRunner, block_size: int,
                 num_staging_blocks: int) -> None:
        self.inner = inner
        self.runner = runner
        self.block_size = block_size
        self.size = runner.group.size
        self.num_staging_blocks = num_staging_blocks
        self._free_staging = list(range(num_staging_blocks - 1, 0, -1))  # staging block 0 stays unused
        self._staged: dict[str, tuple[list[int], list[int], list[int]]] = {}  # rid -> staging, global k, rounds
        self._num_local: dict[str, int] = {}
        self._failed: dict[str, str] = {}
        self.staging: torch.Tensor | None = None

    # ---- scheduler half ---------------------------------------------------------------------------

    @property
    def kv_load_failure_policy(self) -> str:
        return self.inner.kv_load_failure_policy

    def request_added(self, request: Any) -> None:
        self.inner.request_added(request)

    def held_block_budget(self, num_blocks: int) -> int | None:
        return self.inner.held_block_budget(num_blocks)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        n, load_async = self.inner.get_num_new_matched_tokens(request, num_computed_tokens)
        self._num_local[request.request_id] = num_computed_tokens
        return n, load_async

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        rid = request.request_id
        num_local = self._num_local.pop(rid, 0)
        bs = self.block_size
        first, end = num_local // bs, -(-(num_local + num_external_tokens) // bs)
        if num_external_tokens == 0 or end <= first:
            self.inner.update_state_after_alloc(request, [], num_external_tokens)
            return
        if end - first > len(self._free_staging):
            self.inner.update_state_after_alloc(request, [], 0)
            self.inner.abort(rid)
            self._failed[rid] = (f"the DCP staging cache has {len(self._free_staging)} free blocks, this load "
                                 f"needs {end - first}: raise num_staging_blocks")
            return
        staging = [self._free_staging.pop() for _ in range(end - first)]
        self._staged[rid] = (staging, list(range(first, end)), list(block_ids))
        # The connector pairs its blocks [first, end) with ours by index; the leading prefix hits
        # it skips need no staging block.
        self.inner.update_state_after_alloc(request, [0] * first + staging, num_external_tokens)

    def build_connector_meta(self, scheduled: dict[str, int]) -> Any:
        return self.inner.build_connector_meta(scheduled)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._release(request.request_id)
        self._num_local.pop(request.request_id, None)
        return self.inner.request_finished(request, [])  # never a producer: nothing to hold

    def on_block_evicted(self, block_hash: bytes, block_id: int) -> None:
        """A round spans N blocks under one hash that no tier knows: nothing to offer."""

    # ---- worker half ------------------------------------------------------------------------------

    def register_kv_cache(self, kv_cache: torch.Tensor, layout: dict[str, Any]) -> None:
        self.staging = torch.empty((self.num_staging_blocks, *kv_cache.shape[1:]), dtype=kv_cache.dtype)
        self.inner.register_kv_cache(self.staging, layout)

    def start_load_kv(self, meta: Any) -> None:
        self.inner.start_load_kv(meta)

    def save_kv(self, meta: Any) -> None:
        self.inner.save_kv(meta)

    def get_finished(self) -> tuple[set[str], set[str], dict[str, str]]:
        sent, received, failed = self.inner.get_finished()
        for rid in received:
            staged = self._staged.get(rid)
            if staged is not None:
                staging, global_blocks, rounds = staged
                k = np.asarray(global_blocks, dtype=np.int64)
                dest_ids = np.asarray(rounds, dtype=np.int64)[k // self.size]
                self.runner.write_blocks(self.staging, np.asarray(staging, dtype=np.int64), k % self.size, dest_ids)
            self._release(rid)
        for rid in failed:
            self._release(rid)
        failed = {**failed, **self._failed}
        self._failed = {}
        return sent, received, failed

    def abort(self, request_id: str) -> None:
        self.inner.abort(request_id)
        self._release(request_id)
        self._failed.pop(request_id, None)

    def _release(self, request_id: str) -> None:
        staged = self._staged.pop(request_id, None)
        if staged is not None:
            self._free_staging.extend(staged[0])

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), "dcp_staging_blocks_free": len(self._free_staging),
                "dcp_staging_blocks": self.num_staging_blocks - 1}

    def shutdown(self) -> None:
        self.inner.shutdown()
