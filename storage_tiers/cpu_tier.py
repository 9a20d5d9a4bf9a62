"""The CPU-RAM tier: one preallocated uint8 pool of ``capacity_bytes // block_bytes`` block slots.

Preallocated, so serving never calls the allocator and the footprint is known at start-up; page-
locked (pinned) when CUDA is present, so a load into the GPU cache is one DMA with no staging.
A slot is pinned while a reader holds its view (``get`` … ``release``) and is never evicted or
overwritten then; eviction takes the least recently used unpinned slot and hands its bytes to
``on_evict`` (the hierarchy demotes them to disk) before the slot is reused.

A request's blocks enter the LRU order last-block-first, so under pressure a prefix's tail goes
before its head: the head is what the most future requests share.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from storage_tiers.base import Key, StorageTier, StorageTierError, as_block_bytes
from storage_tiers.metrics import TierMetrics

EvictHook = Callable[[Key, torch.Tensor], None]


class CpuTier(StorageTier):
    name = "cpu"

    def __init__(self, capacity_bytes: int, block_bytes: int, *, pin_memory: bool | None = None,
                 on_evict: EvictHook | None = None, registry: Any = None) -> None:
        super().__init__(block_bytes)
        num_slots = int(capacity_bytes) // self.block_bytes
        if num_slots < 1:
            raise StorageTierError(f"cpu tier capacity {capacity_bytes} B holds no block of {block_bytes} B")
        self.pinned_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.pool = torch.empty((num_slots, self.block_bytes), dtype=torch.uint8, pin_memory=self.pinned_memory)
        self.on_evict = on_evict
        self.metrics = TierMetrics(self.name, registry)
        self._lock = threading.RLock()
        self._slots: OrderedDict[Key, int] = OrderedDict()  # least recently used first
        self._free = list(range(num_slots - 1, -1, -1))
        self._pins: dict[Key, int] = {}
        self._rejected = 0

    # ---- reads --------------------------------------------------------------------------------

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        with self._lock:
            return [k in self._slots for k in keys]

    def get(self, keys: Sequence[Key], *, record: bool = True) -> list[torch.Tensor | None]:
        """``record=False``: a re-read the caller already counted (the hierarchy's promotion)."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        with self._lock:
            for i in range(len(keys) - 1, -1, -1):  # tail first: the head ends most recently used
                slot = self._slots.get(keys[i])
                if slot is None:
                    continue
                self._slots.move_to_end(keys[i])
                self._pins[keys[i]] = self._pins.get(keys[i], 0) + 1
                out[i] = self.pool[slot]
        if not record:
            return out
        hits = sum(b is not None for b in out)
        self.metrics.add("hits", hits)
        self.metrics.add("misses", len(keys) - hits)
        self.metrics.add("bytes_out", hits * self.block_bytes)
        return out

    def release(self, keys: Sequence[Key]) -> None:
        with self._lock:
            for k in keys:
                n = self._pins.get(k, 0) - 1
                if n > 0:
                    self._pins[k] = n
                else:
                    self._pins.pop(k, None)

    # ---- writes -------------------------------------------------------------------------------

    def put(self, keys: Sequence[Key], buffers: Sequence[torch.Tensor] | torch.Tensor) -> int:
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        with self._lock:
            taken: list[tuple[int, int]] = []  # (index into keys, slot)
            batch: set[Key] = set()
            for i, k in enumerate(keys):  # head first: when space runs out, the tail is what is refused
                if k in self._slots:
                    continue
                slot = self._take_slot()
                if slot is None:  # every slot is pinned by a reader (or by this batch)
                    self._rejected += 1
                    continue
                self._slots[k] = slot
                self._pins[k] = self._pins.get(k, 0) + 1  # a later slot of this batch must not evict it
                batch.add(k)
                taken.append((i, slot))
            for k in reversed(keys):  # ...but the head ends most recently used
                if k in self._slots:
                    self._slots.move_to_end(k)
            try:
                self._copy_in(buffers, taken)
            finally:
                self.release(list(batch))
        self.metrics.add("bytes_in", len(taken) * self.block_bytes)
        return len(taken)

    def _copy_in(self, buffers: Sequence[torch.Tensor] | torch.Tensor, taken: list[tuple[int, int]]) -> None:
        if not taken:
            return
        if isinstance(buffers, torch.Tensor) and buffers.dim() == 2 and buffers.dtype == torch.uint8:
            rows = torch.tensor([i for i, _ in taken], device=buffers.device)
            slots = torch.tensor([s for _, s in taken])
            self.pool.index_copy_(0, slots, buffers.index_select(0, rows).to("cpu"))
            return
        for i, slot in taken:
            self.pool[slot].copy_(as_block_bytes(buffers[i], self.block_bytes))

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for k in self._slots:
            if k not in self._pins:
                return self._evict_key(k)
        return None

    def _evict_key(self, key: Key) -> int:
        slot = self._slots.pop(key)
        self.metrics.add("evictions")
        if self.on_evict is not None:
            self.on_evict(key, self.pool[slot])  # copies the bytes out before the slot is reused
        return slot

    def evict(self, nbytes: int) -> int:
        freed = 0
        with self._lock:
            while len(self._free) * self.block_bytes < nbytes:
                victim = next((k for k in self._slots if k not in self._pins), None)
                if victim is None:
                    break
                self._free.append(self._evict_key(victim))
                freed += self.block_bytes
        return freed

    # ---- accounting -----------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.pool.shape[0] * self.block_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return len(self._slots) * self.block_bytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            blocks, pinned, rejected = len(self._slots), len(self._pins), self._rejected
        return {**self.metrics.snapshot(), "blocks": blocks, "pinned_blocks": pinned, "rejected": rejected,
                "used_bytes": blocks * self.block_bytes, "capacity_bytes": self.capacity_bytes,
                "pinned_memory": self.pinned_memory}
