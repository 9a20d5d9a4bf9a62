"""The tier interface: a byte-capped, evicting store of fixed-size blocks named by their prefix hash.

A block is immutable: the same key always names the same bytes (the key hashes the model, the
layout and every token up to the block's end), so ``put`` of a key already held only refreshes
its recency, and a tier never needs to invalidate anything.

Reads pin: ``get`` returns one buffer per key (a miss is ``None``), and a tier whose buffers are
views of its own memory (CPU) will not evict or overwrite those blocks until the caller
``release``s the keys it got. ``read`` does both around a ``with`` block. Buffers are 1-D uint8
tensors of ``block_bytes``; ``put`` takes tensors of any dtype and shape holding that many bytes
(or one ``[n, block_bytes]`` tensor), on any device, and copies them before it returns — the
caller may overwrite its source at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

Key = bytes


class StorageTierError(RuntimeError):
    """A tier that cannot work as configured (an unwritable path, a capacity below one block)."""


def as_block_bytes(buf: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """``buf`` as a flat uint8 tensor of exactly ``block_bytes`` (a view when it is contiguous)."""
    flat = buf.contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.numel() != block_bytes:
        raise ValueError(f"a block holds {block_bytes} bytes, got a buffer of {flat.numel()}")
    return flat


class StorageTier(ABC):
    name: str = "tier"

    def __init__(self, block_bytes: int) -> None:
        if block_bytes <= 0:
            raise StorageTierError(f"block_bytes must be positive, got {block_bytes}")
        self.block_bytes = int(block_bytes)

    @abstractmethod
    def contains(self, keys: Sequence[Key]) -> list[bool]:
        """Whether each key is held. No recency change, no hit counted: this is a lookup."""

    def count_prefix(self, keys: Sequence[Key]) -> int:
        """How many of ``keys``, from the first, are held without a gap."""
        n = 0
        for present in self.contains(keys):
            if not present:
                break
            n += 1
        return n

    @abstractmethod
    def get(self, keys: Sequence[Key]) -> list[torch.Tensor | None]:
        """One uint8 buffer per key, ``None`` for a miss; hits are pinned until ``release``."""

    def release(self, keys: Sequence[Key]) -> None:
        """Unpin keys that ``get`` returned a buffer for (each once per such ``get``)."""

    @contextmanager
    def read(self, keys: Sequence[Key]) -> Iterator[list[torch.Tensor | None]]:
        bufs = self.get(keys)
        try:
            yield bufs
        finally:
            self.release([k for k, b in zip(keys, bufs) if b is not None])

    @abstractmethod
    def put(self, keys: Sequence[Key], buffers: Sequence[torch.Tensor] | torch.Tensor) -> int:
        """Store blocks (copied before returning); returns how many were newly accepted."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def evict(self, nbytes: int) -> int:
        """Evict least recently used, unpinned blocks until ``nbytes`` are free; returns bytes freed."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Plain counters: hits, misses, bytes_in, bytes_out, evictions, blocks, used/capacity bytes..."""

    def flush(self) -> None:
        """Wait until every accepted put is durable in this tier (no-op for memory tiers)."""

    def close(self) -> None:
        """Release threads and files; idempotent."""
