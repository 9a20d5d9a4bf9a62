"""Storage-tier bandwidth: what offloading and reloading KV blocks costs, next to what the hardware does.

- ``cpu``: ``CpuTier.put`` of N blocks taken from a cache tensor (offload) and ``get`` + copy into
  other cache blocks + ``release`` (reload), against one plain ``copy_`` of the same bytes and a
  per-block ``copy_`` loop (the floor for scattered blocks). With CUDA: pinned-pool → GPU (H2D)
  and GPU → pinned-pool (D2H) per block, against one contiguous pinned copy each way.
- ``disk``: ``DiskTier.put`` + ``flush`` (writes behind, through the page cache, no fsync) and
  ``get`` of every block from a freshly started tier (index rebuilt, checksums checked), against
  ``dd bs=8M`` on the same directory with ``oflag=direct``/``iflag=direct`` (bypassing the page
  cache) where the filesystem supports it, else buffered with ``conv=fdatasync``. The page cache
  is dropped before the read pass when the kernel lets us (root), and the file says whether it was.

``python -m bench.tiers --out DIR [--disk-dir DIR]`` writes ``tiers.json``. Block shapes:
``large`` 2 MiB (Llama-3.1-8B bf16, 16 tokens) and ``small`` 16 KiB (2 layers x 2 heads x 64).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from bench.report import environment, save_json
from storage_tiers import CpuTier, DiskTier

MB = 1 << 20
SHAPES = {"large": 2 * MB, "small": 16 << 10}


def _keys(n: int, tag: str) -> list[bytes]:
    return [hashlib.sha256(f"{tag}-{i}".encode()).digest() for i in range(n)]


def _best(fn, repeats: int) -> float:
    """Best of ``repeats`` wall times: the least disturbed run on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def bench_cpu(block_bytes: int, total_bytes: int, repeats: int) -> dict:
    n = max(1, total_bytes // block_bytes)
    cache = torch.empty((2 * n, block_bytes), dtype=torch.uint8)
    cache.view(torch.int16).random_()
    src_ids = list(range(0, 2 * n, 2))  # scattered, like a request's blocks in a paged cache
    dst_ids = list(range(1, 2 * n, 2))
    keys = _keys(n, f"cpu{block_bytes}")
    nbytes = n * block_bytes
    res: dict = {"block_bytes": block_bytes, "blocks": n, "bytes": nbytes}

    tier = CpuTier(nbytes, block_bytes, registry=CollectorRegistry())

    def offload() -> None:
        tier.evict(nbytes)  # an empty pool each time; its pages were touched by the first put
        tier.put(keys, [cache[i] for i in src_ids])

    offload()

    def reload() -> None:
        bufs = tier.get(keys)
        for i, b in zip(dst_ids, bufs):
            cache[i].copy_(b)
        tier.release(keys)

    reload()
    assert torch.equal(cache[dst_ids], cache[src_ids]), "reload corrupted bytes"
    flat_src, flat_dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    flat_src.random_(0, 255)

    def per_block() -> None:
        for s, d in zip(src_ids, dst_ids):
            cache[d].copy_(cache[s])

    res["offload_GBps"] = _gbps(nbytes, _best(offload, repeats))
    res["reload_GBps"] = _gbps(nbytes, _best(reload, repeats))
    res["memcpy_contiguous_GBps"] = _gbps(nbytes, _best(lambda: flat_dst.copy_(flat_src), repeats))
    res["memcpy_per_block_GBps"] = _gbps(nbytes, _best(per_block, repeats))
    if torch.cuda.is_available():
        res.update(_bench_cuda(tier, keys, block_bytes, n, repeats))
    return res


def _bench_cuda(tier: CpuTier, keys: list[bytes], block_bytes: int, n: int, repeats: int) -> dict:
    gpu = torch.empty((n, block_bytes), dtype=torch.uint8, device="cuda")
    nbytes = n * block_bytes
    stream = torch.cuda.current_stream()

    def h2d() -> None:
        bufs = tier.get(keys)
        for i, b in enumerate(bufs):
            gpu[i].copy_(b, non_blocking=True)
        stream.synchronize()
        tier.release(keys)

    fresh_keys = _keys(n, f"d2h{block_bytes}")
    d2h_tier = CpuTier(nbytes, block_bytes, registry=CollectorRegistry())

    def d2h_fresh() -> None:
        d2h_tier.evict(nbytes)
        d2h_tier.put(fresh_keys, list(gpu))
        stream.synchronize()

    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    flat = gpu.view(-1)
    h2d()
    d2h_fresh()
    return {"pinned_memory": tier.pinned_memory,
            "h2d_from_tier_GBps": _gbps(nbytes, _best(h2d, repeats)),
            "d2h_into_tier_GBps": _gbps(nbytes, _best(d2h_fresh, repeats)),
            "h2d_pinned_contiguous_GBps": _gbps(nbytes, _best(
                lambda: (flat.copy_(pinned, non_blocking=True), stream.synchronize()), repeats)),
            "d2h_pinned_contiguous_GBps": _gbps(nbytes, _best(
                lambda: (pinned.copy_(flat, non_blocking=True), stream.synchronize()), repeats))}


def _drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_disk(root: Path, block_bytes: int, total_bytes: int) -> dict:
    n = max(1, total_bytes // block_bytes)
    nbytes = n * block_bytes
    data = torch.empty((n, block_bytes), dtype=torch.uint8)
    data.view(torch.int16).random_()
    keys = _keys(n, f"disk{block_bytes}")
    d = root / f"tier-{block_bytes}"
    shutil.rmtree(d, ignore_errors=True)
    cap = 3 * (nbytes + n * 128)
    tier = DiskTier(d, cap, block_bytes, io_threads=2, max_pending_bytes=nbytes + block_bytes,
                    registry=CollectorRegistry())
    tier.put(_keys(n, f"warm{block_bytes}"), data)  # touch the staging pool once, as a server has
    tier.flush()
    t0 = time.perf_counter()
    tier.put(keys, data)
    t_queue = time.perf_counter() - t0
    tier.flush()
    t_write = time.perf_counter() - t0
    tier.close()
    dropped = _drop_page_cache()
    t0 = time.perf_counter()
    tier = DiskTier(d, cap, block_bytes, registry=CollectorRegistry())
    t_open = time.perf_counter() - t0
    bufs = tier.get(keys)
    t_read = time.perf_counter() - t0
    ok = all(b is not None and torch.equal(b, data[i]) for i, b in enumerate(bufs))
    tier.close()
    shutil.rmtree(d, ignore_errors=True)
    return {"block_bytes": block_bytes, "blocks": n, "bytes": nbytes, "bytes_intact": ok,
            "put_returns_GBps": _gbps(nbytes, t_queue), "write_GBps": _gbps(nbytes, t_write),
            "restart_index_s": round(t_open, 4), "read_GBps": _gbps(nbytes, t_read),
            "page_cache_dropped_before_read": dropped}


def _dd(args: list[str]) -> float | None:
    """GB/s that dd reports on stderr, or None if dd refused the flags."""
    p = subprocess.run(["dd", *args], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    m = re.search(r"([0-9.,]+) s, ", p.stderr)
    nbytes = re.search(r"^(\d+) bytes", p.stderr, re.MULTILINE)
    if not m or not nbytes:
        return None
    return _gbps(int(nbytes.group(1)), float(m.group(1).replace(",", ".")))


def bench_dd(root: Path, total_bytes: int) -> dict:
    f = root / "dd.bin"
    count = max(1, total_bytes // (8 * MB))
    res: dict = {"bs": "8M", "count": count}
    write = _dd(["if=/dev/zero", f"of={f}", "bs=8M", f"count={count}", "oflag=direct"])
    res["write_mode"] = "oflag=direct"
    if write is None:
        write = _dd(["if=/dev/zero", f"of={f}", "bs=8M", f"count={count}", "conv=fdatasync"])
        res["write_mode"] = "conv=fdatasync"
    res["write_GBps"] = write
    _drop_page_cache()
    read = _dd([f"if={f}", "of=/dev/null", "bs=8M", "iflag=direct"])
    res["read_mode"] = "iflag=direct"
    if read is None:
        read = _dd([f"if={f}", "of=/dev/null", "bs=8M"])
        res["read_mode"] = "buffered"
    res["read_GBps"] = read
    f.unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench_results/tiers"))
    ap.add_argument("--disk-dir", type=Path, default=None, help="a directory on the disk to measure")
    ap.add_argument("--cpu-mb", type=int, default=256, help="bytes moved per CPU measurement")
    ap.add_argument("--disk-mb", type=int, default=256, help="bytes moved per disk measurement")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = args.disk_dir or Path(tempfile.mkdtemp(prefix="kvfabric-bench-tiers-", dir=str(args.out.parent)
                                                   if args.out.parent.exists() else None))
    root.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    result = {"env": environment(device), "disk_dir": str(root),
              "settings": {"cpu_mb": args.cpu_mb, "disk_mb": args.disk_mb, "repeats": args.repeats},
              "cpu": {name: bench_cpu(bb, args.cpu_mb * MB, args.repeats) for name, bb in SHAPES.items()},
              "disk": {name: bench_disk(root, bb, args.disk_mb * MB) for name, bb in SHAPES.items()},
              "dd": bench_dd(root, args.disk_mb * MB)}
    if args.disk_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    save_json(args.out / "tiers.json", result)
    import json

    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
