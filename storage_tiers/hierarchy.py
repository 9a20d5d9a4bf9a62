"""The ordered tiers, CPU first then (optionally) disk, behind the one tier interface.

- ``put`` lands in CPU. A block the CPU tier evicts is **demoted** to disk (the disk tier copies
  it before the slot is reused, and writes it behind); with ``write_through`` every put is also
  queued for disk at once, so a crash or restart loses nothing that was put.
- ``get`` reads CPU first; a disk hit is **promoted** into CPU and handed out as a pinned CPU view
  (when every CPU slot is pinned, the disk tier's own buffer is handed out instead). The disk copy
  stays: a block demoted again later needs no second write.
- ``contains`` / ``count_prefix``: held in any tier.

Config (the connector's ``kv_connector_extra_config``, or a service's tiers section)::

    {"cpu":  {"capacity_bytes": "4GiB", "pin_memory": null},
     "disk": {"path": "/var/cache/kvfabric", "capacity_bytes": "100GiB",
              "write_through": false, "io_threads": 2, "max_pending_bytes": "256MiB"}}

``cpu`` defaults to 1 GiB; no ``disk`` means CPU only. Sizes are integers or strings with a unit
(``K``/``KiB`` = 1024, ``KB`` = 1000; likewise M, G, T).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

import torch

from storage_tiers.base import Key, StorageTier
from storage_tiers.cpu_tier import CpuTier
from storage_tiers.disk_tier import DiskTier

_CPU_KEYS = {"capacity_bytes", "pin_memory"}
_DISK_KEYS = {"path", "capacity_bytes", "write_through", "io_threads", "max_pending_bytes"}
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_bytes(value: int | float | str) -> int:
    """``4096``, ``"512MiB"``, ``"4G"`` (binary) or ``"4GB"`` (decimal) → bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = _SIZE.match(str(value))
    if m is None:
        raise ValueError(f"not a size: {value!r} (expected bytes, or a number with K/M/G/T, KiB.., KB..)")
    num, unit, binary, b = m.groups()
    unit = unit.lower()
    if unit and (binary or not b):
        return int(float(num) * 1024 ** "_kmgt".index(unit))
    return int(float(num) * _UNITS[unit])


def _check_keys(section: str, given: dict[str, Any], known: set[str]) -> None:
    if not isinstance(given, dict):
        raise ValueError(f"tiers config {section!r} must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in tiers config {section!r}; known: {sorted(known)}")


class TierHierarchy(StorageTier):
    name = "hierarchy"

    def __init__(self, cpu: CpuTier, disk: DiskTier | None = None, write_through: bool = False) -> None:
        super().__init__(cpu.block_bytes)
        if disk is not None and disk.block_bytes != cpu.block_bytes:
            raise ValueError(f"cpu tier blocks are {cpu.block_bytes} B but disk tier blocks {disk.block_bytes} B")
        self.cpu, self.disk, self.write_through = cpu, disk, write_through
        self.tiers: dict[str, StorageTier] = {"cpu": cpu, **({"disk": disk} if disk is not None else {})}
        cpu.on_evict = self._demote
        self._lock = threading.Lock()
        self._unpinned_reads: dict[Key, int] = {}  # disk buffers handed out: their release unpins nothing
        self._counts = dict(promotions=0, demotions=0)

    @classmethod
    def from_config(cls, config: dict[str, Any], block_bytes: int, registry: Any = None) -> TierHierarchy:
        _check_keys("tiers", config, {"cpu", "disk"})
        cpu_cfg, disk_cfg = config.get("cpu") or {}, config.get("disk") or {}
        _check_keys("cpu", cpu_cfg, _CPU_KEYS)
        _check_keys("disk", disk_cfg, _DISK_KEYS)
        missing = sorted({"path", "capacity_bytes"} - set(disk_cfg)) if disk_cfg else []
        if missing:
            raise ValueError(f"tiers config 'disk' needs {missing}")
        disk = None
        if disk_cfg:  # first: an unwritable path fails before the CPU pool is allocated
            disk = DiskTier(disk_cfg["path"], parse_bytes(disk_cfg["capacity_bytes"]), block_bytes,
                            io_threads=int(disk_cfg.get("io_threads", 2)),
                            max_pending_bytes=parse_bytes(disk_cfg.get("max_pending_bytes", 256 << 20)),
                            registry=registry)
        try:
            cpu = CpuTier(parse_bytes(cpu_cfg.get("capacity_bytes", 1 << 30)), block_bytes,
                          pin_memory=cpu_cfg.get("pin_memory"), registry=registry)
        except BaseException:
            if disk is not None:
                disk.close()
            raise
        return cls(cpu, disk, bool(disk_cfg.get("write_through", False)))

    # ---- the tier interface ---------------------------------------------------------------------

    def contains(self, keys: Sequence[Key]) -> list[bool]:
        held = self.cpu.contains(keys)
        if self.disk is not None and not all(held):
            missing = [i for i, h in enumerate(held) if not h]
            for i, h in zip(missing, self.disk.contains([keys[i] for i in missing])):
                held[i] = h
        return held

    def get(self, keys: Sequence[Key]) -> list[torch.Tensor | None]:
        bufs = self.cpu.get(keys)
        missing = [i for i, b in enumerate(bufs) if b is None]
        if self.disk is None or not missing:
            return bufs
        found = [(i, b) for i, b in zip(missing, self.disk.get([keys[i] for i in missing])) if b is not None]
        if not found:
            return bufs
        fkeys = [keys[i] for i, _ in found]
        self.cpu.put(fkeys, [b for _, b in found])
        promoted = self.cpu.get(fkeys, record=False)
        with self._lock:
            for (i, disk_buf), cpu_buf in zip(found, promoted):
                if cpu_buf is not None:
                    bufs[i] = cpu_buf
                    self._counts["promotions"] += 1
                else:  # every CPU slot pinned: hand out the disk tier's buffer
                    bufs[i] = disk_buf
                    self._unpinned_reads[keys[i]] = self._unpinned_reads.get(keys[i], 0) + 1
        return bufs

    def release(self, keys: Sequence[Key]) -> None:
        # Reads of one key are interchangeable, so which read's release unpins the CPU slot does not
        # matter: the count of CPU unpins always equals the count of CPU pins.
        to_cpu = []
        with self._lock:
            for k in keys:
                n = self._unpinned_reads.get(k, 0)
                if n > 1:
                    self._unpinned_reads[k] = n - 1
                elif n == 1:
                    del self._unpinned_reads[k]
                else:
                    to_cpu.append(k)
        self.cpu.release(to_cpu)

    def put(self, keys: Sequence[Key], buffers: Sequence[torch.Tensor] | torch.Tensor) -> int:
        n = self.cpu.put(keys, buffers)
        if self.disk is None:
            return n
        if self.write_through:
            self.disk.put(keys, buffers)
        elif n < len(keys):  # CPU full of pinned blocks: straight to disk
            idx = [i for i, held in enumerate(self.cpu.contains(keys)) if not held]
            n += self.disk.put([keys[i] for i in idx], [buffers[i] for i in idx])
        return n

    def _demote(self, key: Key, buf: torch.Tensor) -> None:
        if self.disk is not None and not self.disk.contains([key])[0]:
            if self.disk.put([key], [buf]):
                with self._lock:
                    self._counts["demotions"] += 1

    def evict(self, nbytes: int) -> int:
        return self.cpu.evict(nbytes)

    @property
    def capacity_bytes(self) -> int:
        return sum(t.capacity_bytes for t in self.tiers.values())

    @property
    def used_bytes(self) -> int:
        return sum(t.used_bytes for t in self.tiers.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        return {**counts, "write_through": self.write_through,
                **{name: tier.stats() for name, tier in self.tiers.items()}}

    def flush(self) -> None:
        for tier in self.tiers.values():
            tier.flush()

    def close(self) -> None:
        for tier in self.tiers.values():
            tier.close()
