"""Storage tiers: bytes come back exactly, LRU evicts in order, the disk survives restarts and
corruption, a full disk degrades to misses, and the hierarchy demotes and promotes."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from storage_tiers import CpuTier, DiskTier, StorageTierError, TierHierarchy, parse_bytes

BLOCK_SHAPE = (2, 2, 4, 2, 8)  # [num_layers, K/V, block_size, num_kv_heads, head_dim]
DTYPES = [torch.float32, torch.bfloat16]


def key(i: int) -> bytes:
    return hashlib.sha256(f"block-{i}".encode()).digest()


def block(i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(BLOCK_SHAPE, generator=g).to(dtype)


def nbytes(dtype: torch.dtype = torch.float32) -> int:
    return block(0, dtype).numel() * dtype.itemsize


def as_block(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return buf.view(dtype).view(BLOCK_SHAPE)


def disk_tier(path: Path, num_blocks: int, dtype: torch.dtype = torch.float32, **kw) -> DiskTier:
    """A disk tier whose cap holds exactly ``num_blocks`` files."""
    per_file = 20 + 32 + nbytes(dtype)
    return DiskTier(path, num_blocks * per_file, nbytes(dtype), registry=CollectorRegistry(), **kw)


def files(path: Path) -> list[Path]:
    return sorted(path.glob("*/*.kvb"))


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_tier_returns_the_bytes_put(dtype):
    tier = CpuTier(8 * nbytes(dtype), nbytes(dtype), registry=CollectorRegistry())
    assert tier.put([key(i) for i in range(4)], [block(i, dtype) for i in range(4)]) == 4
    with tier.read([key(i) for i in range(5)]) as bufs:
        assert bufs[4] is None
        for i in range(4):
            assert torch.equal(as_block(bufs[i], dtype), block(i, dtype))
    assert tier.stats()["pinned_blocks"] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_disk_tier_returns_the_bytes_put_from_the_file(tmp_path, dtype):
    tier = disk_tier(tmp_path, 8, dtype)
    tier.put([key(i) for i in range(4)], [block(i, dtype) for i in range(4)])
    tier.flush()
    assert len(files(tmp_path)) == 4 and tier.stats()["pending_writes"] == 0
    bufs = tier.get([key(i) for i in range(5)])
    assert bufs[4] is None
    for i in range(4):
        assert torch.equal(as_block(bufs[i], dtype), block(i, dtype))
    tier.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_hierarchy_returns_the_bytes_put_from_either_tier(tmp_path, dtype):
    h = TierHierarchy(CpuTier(2 * nbytes(dtype), nbytes(dtype), registry=CollectorRegistry()),
                      disk_tier(tmp_path, 16, dtype))
    h.put([key(i) for i in range(6)], [block(i, dtype) for i in range(6)])  # 4 of them only on disk
    h.flush()
    for i in range(6):
        with h.read([key(i)]) as (buf,):
            assert torch.equal(as_block(buf, dtype), block(i, dtype))
    h.close()


def test_put_accepts_one_stacked_tensor_of_rows():
    tier = CpuTier(4 * nbytes(), nbytes(), registry=CollectorRegistry())
    rows = torch.stack([block(i).view(-1).view(torch.uint8) for i in range(3)])
    assert tier.put([key(i) for i in range(3)], rows) == 3
    with tier.read([key(1)]) as (buf,):
        assert torch.equal(as_block(buf, torch.float32), block(1))


def test_a_buffer_of_the_wrong_size_is_refused():
    tier = CpuTier(4 * nbytes(), nbytes(), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="holds 1024 bytes"):
        tier.put([key(0)], [torch.zeros(3)])


# ---- LRU ------------------------------------------------------------------------------------------


def test_cpu_tier_evicts_the_least_recently_used_block():
    tier = CpuTier(3 * nbytes(), nbytes(), registry=CollectorRegistry())
    for i in range(3):
        tier.put([key(i)], [block(i)])
    with tier.read([key(0)]):  # 0 is now the most recent
        pass
    tier.put([key(3)], [block(3)])
    assert tier.contains([key(i) for i in range(4)]) == [True, False, True, True]
    assert tier.stats()["evictions"] == 1


def test_cpu_tier_evicts_a_prefix_tail_before_its_head():
    tier = CpuTier(3 * nbytes(), nbytes(), registry=CollectorRegistry())
    tier.put([key(i) for i in range(3)], [block(i) for i in range(3)])  # one request's blocks 0, 1, 2
    tier.put([key(9)], [block(9)])
    assert tier.contains([key(0), key(1), key(2)]) == [True, True, False]


def test_cpu_tier_never_evicts_a_pinned_block():
    tier = CpuTier(2 * nbytes(), nbytes(), registry=CollectorRegistry())
    tier.put([key(0), key(1)], [block(0), block(1)])
    (pinned,) = tier.get([key(0)])
    tier.put([key(1)], [block(1)])  # 1 is now more recent than 0, yet 0 is pinned
    assert tier.put([key(2)], [block(2)]) == 1
    assert tier.contains([key(0), key(1), key(2)]) == [True, False, True]
    assert torch.equal(as_block(pinned, torch.float32), block(0))
    tier.get([key(2)])  # every slot pinned now: a put is refused, not forced
    assert tier.put([key(3)], [block(3)]) == 0
    assert tier.stats()["rejected"] == 1
    tier.release([key(0), key(2)])
    assert tier.put([key(3)], [block(3)]) == 1


def test_disk_tier_evicts_the_least_recently_used_file(tmp_path):
    tier = disk_tier(tmp_path, 3)
    for i in range(3):
        tier.put([key(i)], [block(i)])
        tier.flush()
    tier.get([key(0)])
    tier.put([key(3)], [block(3)])
    tier.flush()
    assert tier.contains([key(i) for i in range(4)]) == [True, False, True, True]
    assert len(files(tmp_path)) == 3
    assert tier.used_bytes <= tier.capacity_bytes
    tier.close()


# ---- restart and corruption -------------------------------------------------------------------------


def test_a_new_disk_tier_on_the_same_directory_finds_the_blocks(tmp_path):
    tier = disk_tier(tmp_path, 8)
    tier.put([key(i) for i in range(5)], [block(i) for i in range(5)])
    tier.close()
    again = disk_tier(tmp_path, 8)
    assert again.contains([key(i) for i in range(6)]) == [True] * 5 + [False]
    assert again.stats()["recovered"] == 5
    for i, buf in enumerate(again.get([key(i) for i in range(5)])):
        assert torch.equal(as_block(buf, torch.float32), block(i))
    again.close()


def test_restart_keeps_the_lru_order_of_the_files(tmp_path):
    tier = disk_tier(tmp_path, 3)
    for i in range(3):
        tier.put([key(i)], [block(i)])
        tier.flush()
    for i in range(3):  # mtimes far apart, whatever the clock's resolution
        os.utime(tier._path(key(i)), (1000 + i, 1000 + i))
    tier.close()
    again = disk_tier(tmp_path, 3)
    again.put([key(3)], [block(3)])
    again.flush()
    assert again.contains([key(i) for i in range(4)]) == [False, True, True, True]
    again.close()


def test_a_smaller_cap_at_restart_evicts_down_to_it(tmp_path):
    tier = disk_tier(tmp_path, 6)
    tier.put([key(i) for i in range(6)], [block(i) for i in range(6)])
    tier.close()
    again = disk_tier(tmp_path, 2)
    assert sum(again.contains([key(i) for i in range(6)])) == 2 and len(files(tmp_path)) == 2
    again.close()


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_a_corrupt_file_reads_as_a_miss_and_is_deleted(tmp_path, damage):
    tier = disk_tier(tmp_path, 8)
    tier.put([key(0), key(1)], [block(0), block(1)])
    tier.flush()
    path = tier._path(key(0))
    raw = bytearray(path.read_bytes())
    if damage == "flip_byte":
        raw[-100] ^= 0x01
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    bufs = tier.get([key(0), key(1)])
    assert bufs[0] is None and torch.equal(as_block(bufs[1], torch.float32), block(1))
    assert not path.exists()
    assert tier.contains([key(0)]) == [False]
    assert tier.stats()["corrupt"] == 1
    tier.close()


def test_restart_deletes_torn_and_temporary_files(tmp_path):
    tier = disk_tier(tmp_path, 8)
    tier.put([key(i) for i in range(3)], [block(i) for i in range(3)])
    tier.close()
    torn = tier._path(key(1))
    torn.write_bytes(torn.read_bytes()[:-7])
    tmp = torn.with_name(torn.name + ".1234.5678.tmp")
    tmp.write_bytes(b"half a block")
    again = disk_tier(tmp_path, 8)
    assert again.contains([key(0), key(1), key(2)]) == [True, False, True]
    assert not torn.exists() and not tmp.exists()
    assert again.stats()["recovered_deleted"] == 2
    again.close()


# ---- a full disk, a bad path --------------------------------------------------------------------------


def test_over_the_cap_the_disk_tier_keeps_only_the_newest(tmp_path):
    tier = disk_tier(tmp_path, 3)
    for i in range(10):
        tier.put([key(i)], [block(i)])
    tier.flush()
    assert tier.contains([key(i) for i in range(10)]) == [False] * 7 + [True] * 3
    assert tier.used_bytes <= tier.capacity_bytes
    tier.close()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_gives_misses_and_one_warning(tiny_tmpfs, caplog):
    bb = 64 << 10
    tier = DiskTier(tiny_tmpfs, 16 << 20, bb, registry=CollectorRegistry())  # cap 16 MiB on a 1 MiB disk
    caplog.set_level(logging.WARNING, logger="storage_tiers.disk_tier")
    data = [torch.full((bb,), i % 251, dtype=torch.uint8) for i in range(40)]
    for i in range(40):
        tier.put([key(i)], [data[i]])
        tier.flush()
    stats = tier.stats()
    assert stats["disk_full"] and stats["write_errors"] >= 1
    assert len([r for r in caplog.records if "disk is full" in r.getMessage()]) == 1
    assert tier.capacity_bytes < 1 << 20 and tier.used_bytes <= tier.capacity_bytes
    held = tier.contains([key(i) for i in range(40)])
    assert 0 < sum(held) < 40  # the newest blocks, in what the disk could take
    for i, buf in enumerate(tier.get([key(i) for i in range(40)])):
        assert (buf is not None) == held[i]
        if buf is not None:
            assert torch.equal(buf, data[i])
    tier.close()


def test_an_unwritable_path_is_a_clear_error_at_construction(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StorageTierError, match="not a writable directory"):
        DiskTier(not_a_dir / "kv", 1 << 20, 1024, registry=CollectorRegistry())


def test_one_directory_serves_one_disk_tier(tmp_path):
    first = disk_tier(tmp_path, 4)
    with pytest.raises(StorageTierError, match="in use"):
        disk_tier(tmp_path, 4)
    first.close()
    disk_tier(tmp_path, 4).close()


# ---- the hierarchy -------------------------------------------------------------------------------------


def hierarchy(tmp_path: Path, cpu_blocks: int, disk_blocks: int = 16, write_through: bool = False) -> TierHierarchy:
    return TierHierarchy.from_config(
        {"cpu": {"capacity_bytes": cpu_blocks * nbytes()},
         "disk": {"path": str(tmp_path), "capacity_bytes": disk_blocks * (52 + nbytes()), "write_through": write_through}},
        nbytes(), registry=CollectorRegistry())


def test_a_block_evicted_from_cpu_is_demoted_to_disk(tmp_path):
    h = hierarchy(tmp_path, cpu_blocks=2)
    for i in range(3):
        h.put([key(i)], [block(i)])
    h.flush()
    assert h.cpu.contains([key(0), key(1), key(2)]) == [False, True, True]
    assert h.disk.contains([key(0), key(1), key(2)]) == [True, False, False]
    assert h.contains([key(0), key(1), key(2), key(3)]) == [True, True, True, False]
    assert h.stats()["demotions"] == 1
    h.close()


def test_a_disk_hit_is_promoted_to_cpu(tmp_path):
    h = hierarchy(tmp_path, cpu_blocks=2)
    for i in range(3):
        h.put([key(i)], [block(i)])
    h.flush()
    with h.read([key(0)]) as (buf,):
        assert torch.equal(as_block(buf, torch.float32), block(0))
        assert buf.data_ptr() >= h.cpu.pool.data_ptr()  # a view of the CPU pool, pinned
    assert h.cpu.contains([key(0)]) == [True]
    s = h.stats()
    assert s["promotions"] == 1 and s["disk"]["hits"] == 1 and s["cpu"]["misses"] == 1
    assert s["cpu"]["pinned_blocks"] == 0
    h.close()


def test_with_every_cpu_slot_pinned_a_disk_hit_is_still_served(tmp_path):
    h = hierarchy(tmp_path, cpu_blocks=1)
    h.put([key(0)], [block(0)])
    h.put([key(1)], [block(1)])  # 0 demoted
    h.flush()
    bufs = h.get([key(1), key(0)])  # 1 pins the only slot; 0 comes from its file
    assert torch.equal(as_block(bufs[1], torch.float32), block(0))
    h.release([key(1), key(0)])
    assert h.cpu.stats()["pinned_blocks"] == 0
    h.close()


def test_write_through_puts_reach_disk_at_once(tmp_path):
    h = hierarchy(tmp_path, cpu_blocks=4, write_through=True)
    h.put([key(0), key(1)], [block(0), block(1)])
    h.flush()
    assert h.disk.contains([key(0), key(1)]) == [True, True] and len(files(tmp_path)) == 2
    h.close()


def test_the_tiers_config_is_checked():
    with pytest.raises(ValueError, match="unknown keys"):
        TierHierarchy.from_config({"cpu": {"capacity": 10}}, 1024)
    with pytest.raises(ValueError, match="needs"):
        TierHierarchy.from_config({"disk": {"path": "/tmp/x"}}, 1024)


def test_sizes_parse_with_units():
    assert parse_bytes(4096) == 4096
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("4G") == 4 << 30
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("1.5 KiB") == 1536
    with pytest.raises(ValueError):
        parse_bytes("lots")


# ---- concurrency and metrics ---------------------------------------------------------------------------


def test_reads_see_exact_bytes_while_writes_go_on_behind(tmp_path):
    h = hierarchy(tmp_path, cpu_blocks=8, disk_blocks=64)
    written: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        rng = random.Random(0)
        try:
            while not stop.is_set():
                if not written:
                    continue
                i = rng.choice(written[-40:])
                with h.read([key(i)]) as (buf,):
                    if buf is not None:
                        assert torch.equal(as_block(buf, torch.float32), block(i)), i
        except BaseException as e:  # noqa: BLE001 — surfaced below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(200):
        h.put([key(i)], [block(i)])
        written.append(i)
    stop.set()
    for t in threads:
        t.join()
    h.flush()
    assert not errors, errors[0]
    assert h.cpu.stats()["pinned_blocks"] == 0
    assert all(h.contains([key(i) for i in range(190, 200)]))
    h.close()


def test_counters_are_exported_to_prometheus():
    registry = CollectorRegistry()
    tier = CpuTier(4 * nbytes(), nbytes(), registry=registry)
    tier.put([key(0)], [block(0)])
    with tier.read([key(0), key(1)]):
        pass
    sample = lambda name: registry.get_sample_value(name, {"tier": "cpu"})  # noqa: E731
    assert sample("kvfabric_tier_hits_total") == 1
    assert sample("kvfabric_tier_misses_total") == 1
    assert sample("kvfabric_tier_bytes_in_total") == nbytes()
    assert sample("kvfabric_tier_bytes_out_total") == nbytes()
    assert tier.stats()["hits"] == 1
