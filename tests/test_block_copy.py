"""kv_connector/block_copy.py on the host: every path against a plain index copy, including ids that
look like a run by their ends only, many stretches (the gather paths), and one run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_connector import block_copy


def _blocks(n: int = 64, row: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (n, row), dtype=torch.uint8)


CASES = {
    "ends-like-a-run": [1, 3, 2, 4],  # last - first == len - 1, yet not consecutive
    "one-run": [5, 6, 7, 8, 9],
    "reversed": [9, 8, 7, 6],
    "scattered": list(np.random.default_rng(0).permutation(63)[:40] + 1),
}


@pytest.mark.parametrize("ids", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("max_copies", [256, 1], ids=["per-run", "gather"])
def test_gather_rows(ids, max_copies, monkeypatch):
    monkeypatch.setattr(block_copy, "_MAX_COPIES", max_copies)
    src = _blocks()
    dst = torch.zeros((len(ids), src.shape[1]), dtype=torch.uint8)
    block_copy.gather_rows(dst, src, ids)
    assert torch.equal(dst, src[torch.tensor(ids)])


@pytest.mark.parametrize("ids", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("max_copies", [256, 1], ids=["per-stretch", "gather"])
def test_copy_rows_between_host_caches(ids, max_copies, monkeypatch):
    monkeypatch.setattr(block_copy, "_MAX_COPIES", max_copies)
    src, dst = _blocks(), _blocks()
    want = dst.clone()
    dst_ids = np.asarray(list(reversed(range(10, 10 + len(ids)))) if len(ids) % 2 else range(20, 20 + len(ids)))
    want[torch.from_numpy(dst_ids)] = src[torch.tensor(ids)]
    block_copy.copy_rows(dst, dst_ids, src, np.asarray(ids))
    assert torch.equal(dst, want)


_INTERPRETED = """
import sys, numpy as np, torch
from kv_connector.block_copy_kernel import copy_rows_kernel
for row in (48, 6, 7, 40000):  # int64, int16 and byte words; a row of several programs' chunks
    g = np.random.default_rng(row)
    src = torch.randint(0, 256, (20, row), dtype=torch.uint8)
    dst = torch.randint(0, 256, (30, row), dtype=torch.uint8)
    want = dst.clone()
    s_ids, d_ids = g.permutation(20)[:12], g.permutation(30)[:12]
    want[torch.from_numpy(d_ids)] = src[torch.from_numpy(s_ids)]
    copy_rows_kernel(dst, torch.from_numpy(d_ids), src, torch.from_numpy(s_ids))
    assert torch.equal(dst, want), row
print("ok")
"""


def test_the_copy_kernel_moves_every_byte_in_the_interpreter():
    """block_copy_kernel under Triton's CPU interpreter: row widths of every word size and a row of
    several chunks, scattered on both sides, untouched rows left alone."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["gpu", "pinned", "shared-pinned", "pageable"])
@pytest.mark.parametrize("row", [16 << 10, 2 << 20, 6], ids=["16KiB", "2MiB", "6B"])
@pytest.mark.parametrize("scattered", [True, False], ids=["scattered", "runs"])
def test_copy_rows_into_a_gpu(source, row, scattered):
    """copy_rows into a GPU cache from each memory it meets, by whichever path it picks (memcpy, DMA
    per stretch, the kernel on GPU or pinned host memory, a host gather): every byte lands."""
    from kv_connector.shm_segment import ShmSegment

    n = max(4, min(64, (8 << 20) // row))
    g = np.random.default_rng(row)
    data = torch.randint(0, 256, (n, row), dtype=torch.uint8)
    seg = None
    if source == "gpu":
        src = data.cuda()
    elif source == "pinned":
        src = data.pin_memory()
    elif source == "shared-pinned":
        seg = ShmSegment.create(data.numel(), pin=True)
        src = seg.buf.view(n, row)
        src.copy_(data)
        assert src.is_pinned()  # so copy_rows may read it in place
    else:
        src = data.clone()
    dst = torch.zeros((n + 3, row), dtype=torch.uint8, device="cuda")
    s_ids = g.permutation(n) if scattered else np.arange(n)
    d_ids = g.permutation(n + 3)[:n] if scattered else np.arange(2, n + 2)
    try:
        block_copy.copy_rows(dst, d_ids, src, s_ids)
        torch.cuda.synchronize()
        want = torch.zeros_like(dst, device="cpu")
        want[torch.from_numpy(d_ids)] = data[torch.from_numpy(s_ids)]
        assert torch.equal(dst.cpu(), want)
    finally:
        if seg is not None:
            seg.close()
