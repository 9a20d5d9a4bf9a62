"""The device's own ceilings, measured in the run that quotes them: copy bandwidth, matmul rate."""

from __future__ import annotations

import time

import torch


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_floors(device: torch.device, dtype: torch.dtype) -> dict:
    """Copy bandwidth counts bytes read plus written; the matmul runs on random data (never zeros)."""
    gpu = device.type == "cuda"
    nbytes = (2 << 30) if gpu else (256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), device)
    n = 8192 if gpu else 1024
    mm_dtype = dtype if gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm_s = _time(lambda: a @ b, device)
    return {"copy_bytes_per_s": 2 * nbytes / copy_s, "copy_bytes": 2 * nbytes,
            "matmul_flops_per_s": 2 * n**3 / mm_s, "matmul_shape": [n, n, n], "matmul_dtype": str(mm_dtype)}
