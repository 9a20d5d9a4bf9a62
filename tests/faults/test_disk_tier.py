"""Scenario 8: the disk tier fills up, then its files are corrupted, under the fault suite's load.

The topology of test_faults with storage tiers on both prefills: a CPU tier of 16 blocks and a disk
write-through tier whose directory is a 1 MiB tmpfs (about 80 block files for the two instances
together) while the tier is configured for 64 MiB, so the disk fills for real (ENOSPC) during the first load.
Then both prefills are stopped (SIGTERM: their writes behind land), every other block file gets
bytes of its payload overwritten, ``up`` restarts the prefills (their prefix caches are empty, the
disk tiers rebuild their index from the files' headers), and the same 32 requests run again: their
prefixes now come from the disk tier, half of it corrupt.

Checked besides test_faults' invariants: the disk did fill (a prefill's tier reports it) and the
load still got its exact greedy text; corrupt files were caught by the checksum (a miss, then
recompute: still the exact text) and deleted; the tier directory holds only its lock and block
files (no temporary file) afterwards; the tmpfs is unmounted at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from storage_tiers.disk_tier import _HDR, MAGIC
from tests.faults.cluster import (RECOVERY_LIMIT_S, Cluster, Load, check_answers, check_no_shm_left, probe,
                                  shm_entries, wait_engines_clean)
from tests.faults.test_faults import CONCURRENCY, REPEAT, RESULTS, jobs, wait_until, write_report  # noqa: F401

TMPFS_SIZE = "1m"


@pytest.fixture(scope="module")
def tier_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-tier")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one failed: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)
        shutil.rmtree(root)
        assert not root.exists()


@pytest.fixture(scope="module")
def tier_cluster(tmp_path_factory, tiny_model_dir, jobs, tier_root):  # noqa: F811
    tiers = {"cpu": {"capacity_bytes": 16 * _block_bytes()}, "disk": {"path": str(tier_root), "capacity_bytes": "64MiB",
                                                                     "write_through": True}}
    c = Cluster(tmp_path_factory.mktemp("faults-tiers"), tiny_model_dir("tiny-llama", with_tokenizer=True),
                extra={"tiers": tiers})
    try:
        yield c.start()
    finally:
        c.stop()
        write_report()


def _block_bytes() -> int:
    from engine.models.config import TINY_CONFIGS

    cfg = TINY_CONFIGS["tiny-llama"]
    return cfg["num_hidden_layers"] * 2 * 16 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # float32 K and V


def _disk_stats(cluster: Cluster) -> list[dict]:
    """Each prefill's disk-tier numbers, picked out of its flattened Health stats (the connector is
    a multi of tiered + zmq, so the names are ``connector_..._tiers_disk_<name>``)."""
    out = []
    for port in cluster.ports["prefill"]:
        flat = cluster.stats("prefill", port)
        out.append({k.rsplit("_tiers_disk_", 1)[1]: v for k, v in flat.items() if "_tiers_disk_" in k})
    return out


def _block_files(root: Path) -> dict[Path, bool]:
    """Every file under the tier root but the instances' lock files -> whether it is a whole block
    file with a good checksum. Anything else (a temporary file, a probe) fails the check."""
    files = {}
    for f in root.rglob("*"):
        if f.is_dir() or f.name == ".lock":
            continue
        assert f.name.endswith(".kvb"), f"a stray file in the disk tier: {f}"
        raw = f.read_bytes()
        magic, _, key_len, payload_len, crc = _HDR.unpack(raw[:_HDR.size])
        body = _HDR.size + key_len
        assert magic == MAGIC and len(raw) == body + payload_len, f"a torn block file: {f}"
        files[f] = zlib.crc32(raw[body:], zlib.crc32(raw[_HDR.size:body])) == crc
    return files


def _corrupt_half(root: Path) -> set[Path]:
    """Overwrite 64 bytes in the middle of the payload of every other block file."""
    hit = set()
    for f in sorted(_block_files(root))[::2]:
        with open(f, "r+b") as fh:
            fh.seek(f.stat().st_size - 4096)
            fh.write(os.urandom(64))
        hit.add(f)
    return hit


async def _no_fault(cluster, load):
    """The disk fills by itself: the tmpfs is far smaller than the tier's configured capacity."""


@pytest.mark.parametrize("repeat", range(REPEAT))
def test_disk_tier_full_then_corrupt(repeat, tier_cluster, tier_root, jobs):  # noqa: F811
    cluster = tier_cluster
    load_jobs, probe_job = jobs[:CONCURRENCY], jobs[CONCURRENCY]
    assert wait_until(cluster.all_healthy, 120), "the topology is not fully healthy before the fault"
    baseline = {port: cluster.stats(role, port)["num_blocks"] - 1 for role, port in cluster.engines()}
    shm_before = shm_entries()
    pids_before = {(r, p): cluster.pid(r, p) for r, p in cluster.engines()}
    started = time.monotonic()

    first = Load(cluster, load_jobs)
    asyncio.run(first.run(_no_fault))
    counts = check_answers(load_jobs, first.outcomes)
    disk = _disk_stats(cluster)
    # ENOSPC (on a write, or at start once a repeat restarted it on a full disk) caps a tier at what
    # it holds: below its configured 64 MiB.
    assert any(d["capacity_bytes"] < d["configured_capacity_bytes"] for d in disk), \
        f"the disk tier never filled: {disk}"
    assert "the disk is full" in cluster.log_path.read_text(), "no warning for the full disk"

    # Stop both prefills (their writes land), corrupt files, let `up` restart them on the same tiers.
    old = [cluster.signal("prefill", i, signal.SIGTERM) for i in (0, 1)]
    assert wait_until(lambda: not any(_alive(p) for p in old), 60), "a prefill did not stop"
    corrupted = _corrupt_half(tier_root)
    assert corrupted, "no block file reached the disk"
    assert wait_until(cluster.all_healthy, 120), "a restarted prefill did not rejoin"

    replay = Load(cluster, load_jobs)
    asyncio.run(replay.run(_no_fault))
    load_done = time.monotonic()
    again = check_answers(load_jobs, replay.outcomes)
    recovery = probe(cluster, probe_job, RECOVERY_LIMIT_S)
    wait_engines_clean(cluster, baseline)
    disk = _disk_stats(cluster)
    caught = sum(d["corrupt"] for d in disk)
    assert caught, f"no corrupt file was read back (the replay missed the disk tier): {disk}"
    assert wait_until(lambda: not any(d["pending_writes"] for d in _disk_stats(cluster)), 30)
    files = _block_files(tier_root)
    still_bad = {f for f in corrupted if files.get(f) is False}
    # A detected file is deleted (or rewritten whole by a later save); only unread ones stay bad.
    assert len(still_bad) <= len(corrupted) - caught, (len(still_bad), len(corrupted), caught)
    assert not {f for f, ok in files.items() if not ok} - corrupted, "a block file went bad by itself"
    check_no_shm_left(shm_before, [*pids_before.values(), *old, *cluster.all_pids()])
    RESULTS.append({"scenario": "disk-tier-full-then-corrupt", "repeat": repeat,
                    **{k: counts[k] + again[k] for k in counts}, "blocks_leaked": 0,
                    "recovery_s": round(recovery, 2), "restarted_instances": 2,
                    "load_s": round(load_done - started, 1), "corrupted_files": len(corrupted),
                    "corrupt_detected": caught, "disk_hits": sum(d.get("hits", 0) for d in disk)})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
