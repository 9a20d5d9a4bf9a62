"""What one move of scattered KV blocks costs on one GPU, by each way of doing it: DMAs (a copy
per stretch of consecutive blocks, or a gather kernel and one DMA), torch's index kernels, and
``block_copy_kernel`` (one Triton kernel that gathers and scatters in a single pass, reading or
writing pinned host memory in place over PCIe); ``*_copy_rows`` is what ``block_copy.copy_rows``
picks, i.e. what the ipc connector does. Next to the plain contiguous copies of the same bytes (the
link's peaks), best of 5, bytes checked.

Directions: ``h2d`` (pinned host rows into a GPU cache: a shared host KV cache read by its
consumer), ``d2h`` (a GPU cache into a pinned buffer: the producer's half of a relay), ``relay``
(both at once on two streams: one relay through host memory in steady state), ``d2d`` (between
two GPU caches: CUDA IPC on one GPU).

    python -m bench.block_copy --sizes-mb 64,1024 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import environment, save_json, save_plot
from kv_connector.block_copy import copy_rows, copy_stretches, gather_rows, ids_on, pair_runs
from kv_connector.block_copy_kernel import copy_rows_kernel, device_view
from kv_connector.shm_segment import ShmSegment

ROWS = {"large": 2 << 20, "small": 16 << 10}  # Llama-3.1-8B's 16-token block; a 2-layer toy's


def _best_s(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def _from_shared_memory(host, gpu_b, src_ids, dst_ids, s_ids, d_ids, stretches) -> dict[str, float]:
    """The same rows in shared memory pinned by cudaHostRegister: what a shared host KV cache is."""
    nbytes = host.numel()
    seg = ShmSegment.create(nbytes, pin=True)
    try:
        shared = seg.buf.view(host.shape)
        shared.copy_(host)
        shared_v = device_view(shared, gpu_b.device)
        return {"peak_h2d_shared": nbytes / _best_s(lambda: gpu_b.copy_(shared, non_blocking=True)),
                "h2d_dma_shared": nbytes / _best_s(lambda: copy_stretches(gpu_b, dst_ids, shared, src_ids, *stretches)),
                "h2d_kernel_shared": nbytes / _best_s(lambda: copy_rows_kernel(gpu_b, d_ids, shared_v, s_ids))}
    finally:
        torch.cuda.synchronize()
        shared = shared_v = None  # the mapping closes only once nothing views it
        seg.close()


def measure(nbytes: int, row: str, scattered: bool, dev: torch.device) -> dict[str, float]:
    rb = ROWS[row]
    n = nbytes // rb
    g = torch.Generator().manual_seed(n)
    ids = (lambda: torch.randperm(n, generator=g).numpy()) if scattered else (lambda: np.arange(n))
    src_ids, dst_ids = ids(), ids()
    host = torch.empty((n, rb), dtype=torch.uint8, pin_memory=True)
    host.view(torch.int32).random_()
    host_out = torch.empty_like(host, pin_memory=True)
    gpu_a = host.to(dev)
    gpu_b = torch.empty_like(gpu_a)
    host_v, host_out_v = device_view(host, dev), device_view(host_out, dev)
    s_ids, d_ids = ids_on(src_ids, dev), ids_on(dst_ids, dev)
    stretches = pair_runs(dst_ids, src_ids)
    gpu_tmp = torch.empty_like(gpu_a)
    up, down = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    want = host[torch.from_numpy(src_ids)]

    def relay(kernel: bool):
        def go():
            with torch.cuda.stream(down):
                if kernel:
                    copy_rows_kernel(host_out_v, d_ids, gpu_a, s_ids)
                else:
                    gather_rows(host_out, gpu_a, src_ids.tolist())
            with torch.cuda.stream(up):
                if kernel:
                    copy_rows_kernel(gpu_b, d_ids, host_v, s_ids)
                else:  # what a ring's drain does: one DMA, one scatter
                    gpu_tmp.copy_(host, non_blocking=True)
                    gpu_b.index_copy_(0, d_ids, gpu_tmp)
        return go

    res = {
        "peak_h2d": nbytes / _best_s(lambda: gpu_b.copy_(host, non_blocking=True)),
        "peak_d2h": nbytes / _best_s(lambda: host_out.copy_(gpu_a, non_blocking=True)),
        "peak_d2d": nbytes / _best_s(lambda: gpu_b.copy_(gpu_a)),
        "h2d_dma": nbytes / _best_s(lambda: copy_stretches(gpu_b, dst_ids, host, src_ids, *stretches)),
    }
    ok = torch.equal(gpu_b[torch.from_numpy(dst_ids).to(dev)].cpu(), want)
    gpu_b.zero_()
    res.update(_from_shared_memory(host, gpu_b, src_ids, dst_ids, s_ids, d_ids, stretches))
    ok &= torch.equal(gpu_b[torch.from_numpy(dst_ids).to(dev)].cpu(), want)
    res["h2d_kernel"] = nbytes / _best_s(lambda: copy_rows_kernel(gpu_b, d_ids, host_v, s_ids))
    ok &= torch.equal(gpu_b[torch.from_numpy(dst_ids).to(dev)].cpu(), want)
    gpu_b.zero_()
    res["h2d_copy_rows"] = nbytes / _best_s(lambda: copy_rows(gpu_b, dst_ids, host, src_ids))
    ok &= torch.equal(gpu_b[torch.from_numpy(dst_ids).to(dev)].cpu(), want)
    gpu_a.copy_(host)
    res["d2h_dma"] = nbytes / _best_s(lambda: gather_rows(host_out, gpu_a, src_ids.tolist()))
    ok &= torch.equal(host_out, want)
    res["d2h_kernel"] = nbytes / _best_s(lambda: copy_rows_kernel(host_out_v, d_ids, gpu_a, s_ids))
    ok &= torch.equal(host_out[torch.from_numpy(dst_ids)], want)
    res["d2d_torch_index"] = nbytes / _best_s(lambda: gpu_b.index_copy_(0, d_ids, gpu_a.index_select(0, s_ids)))
    res["d2d_kernel"] = nbytes / _best_s(lambda: copy_rows_kernel(gpu_b, d_ids, gpu_a, s_ids))
    ok &= torch.equal(gpu_b[torch.from_numpy(dst_ids).to(dev)].cpu(), want)
    gpu_b.zero_()
    res["d2d_copy_rows"] = nbytes / _best_s(lambda: copy_rows(gpu_b, dst_ids, gpu_a, src_ids))
    ok &= torch.equal(gpu_b[torch.from_numpy(dst_ids).to(dev)].cpu(), want)
    res["relay_dma"] = nbytes / _best_s(relay(False))
    res["relay_kernel"] = nbytes / _best_s(relay(True))
    return {k: v / 1e9 for k, v in res.items()} | {"bytes_equal": bool(ok)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.block_copy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="64,1024")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--out", default="bench_results/block_copy")
    args = p.parse_args(argv)
    dev = torch.device("cuda", args.gpu)
    torch.cuda.set_device(dev)
    rows = []
    for mb in (int(x) for x in args.sizes_mb.split(",")):
        for row, scattered in (("large", True), ("small", True), ("small", False)):
            r = {"mb": mb, "row_bytes": ROWS[row], "scattered": scattered,
                 **measure(mb << 20, row, scattered, dev)}
            rows.append(r)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    out = Path(args.out)
    save_json(out / "block_copy.json", {"benchmark": "block_copy", "env": environment(dev), "gb_per_s": rows})
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k.split("_")[0] in ("h2d", "d2h", "d2d", "relay", "peak")]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        label = f"{r['mb']} MB, {r['row_bytes'] >> 10} KiB rows{'' if r['scattered'] else ', contiguous'}"
        ax.bar(np.arange(len(keys)) + i * width, [r[k] for k in keys], width, label=label)
    ax.set_xticks(np.arange(len(keys)) + 0.4, keys, rotation=30, ha="right")
    ax.set_ylabel("GB/s")
    ax.set_yscale("log")
    ax.set_title(f"moving scattered KV blocks on {torch.cuda.get_device_name(dev)}")
    ax.legend(fontsize=7)
    save_plot(fig, out / "block_copy.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
