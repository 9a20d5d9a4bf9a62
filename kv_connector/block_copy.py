"""Copies of whole KV blocks (rows of bytes) between caches in any memory: GPU, host, or a peer's
memory mapped here (CUDA IPC, shared memory). Chosen by what was measured on an H200
(docs/BENCHMARKS.md): one DMA beats a DMA per block; indices go up to a GPU pinned, because a
pageable copy waits for everything queued on its stream; on the host a memcpy per run beats
torch's CPU index kernels several times over.
"""

from __future__ import annotations

import numpy as np
import torch

# Up to this many stretches of consecutive blocks move as one copy each where host memory is
# involved (a DMA into a GPU, a memcpy on the host); more take one gather on the host, which runs
# at CPU speed. A Python call per copy costs a few microseconds: 4,096 DMAs ~ 20 ms, 1 GB at 55 GB/s.
_MAX_COPIES, _MAX_DMAS = 256, 4096


def is_run(ids: np.ndarray) -> bool:
    return len(ids) == 1 or bool(np.all(np.diff(ids) == 1))


def gather_rows(dst: torch.Tensor, blocks: torch.Tensor, ids: list[int]) -> None:
    """``dst[:] = blocks[ids]``. A device cache: one DMA, after a gather kernel unless the ids are a run
    (a DMA per block costs more); the index goes up pinned, as a pageable copy would wait for
    everything queued on the stream. A host cache: one copy per run while runs are few (each a
    multi-threaded memcpy), else one gather."""
    a = np.asarray(ids, dtype=np.int64)
    if is_run(a):
        dst.copy_(blocks[a[0]:a[0] + len(a)], non_blocking=True)
    elif blocks.is_cuda:
        dst.copy_(blocks[torch.from_numpy(a).pin_memory().to(blocks.device, non_blocking=True)], non_blocking=True)
    else:
        starts = np.flatnonzero(np.diff(a, prepend=a[0] - 2) != 1)
        if len(starts) > _MAX_COPIES:
            np.take(blocks.numpy(), a, axis=0, out=dst.numpy())
            return
        for s, e in zip(starts, np.append(starts[1:], len(a))):
            dst[s:e].copy_(blocks[a[s]:a[s] + e - s])


def pair_runs(dst_ids: np.ndarray, src_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the stretches that are runs of consecutive ids on both sides."""
    cuts = np.flatnonzero((np.diff(dst_ids) != 1) | (np.diff(src_ids) != 1)) + 1
    return np.r_[0, cuts], np.r_[cuts, len(dst_ids)]


def copy_rows(dst: torch.Tensor, dst_ids: np.ndarray, src: torch.Tensor, src_ids: np.ndarray) -> None:
    """``dst[dst_ids] = src[src_ids]`` on rows of bytes (``src``: a peer's mapped cache).

    GPU to GPU: a memcpy when both sides are one run; else a gather kernel (straight into the
    destination when that is a run), then a scatter; from another GPU the gather runs where the rows
    are, then one copy over the link. With host memory on either side: one copy per stretch that is
    a run on both sides (a DMA into a GPU, a multi-threaded memcpy on the host; torch's CPU index
    kernels are several times slower), or, past ``_MAX_DMAS`` / ``_MAX_COPIES`` of them, one gather
    on the host."""
    n, a = len(dst_ids), int(dst_ids[0])
    if not (src.is_cuda and dst.is_cuda):
        starts, ends = pair_runs(dst_ids, src_ids)
        if len(starts) <= (_MAX_DMAS if dst.is_cuda else _MAX_COPIES):
            for s0, e0 in zip(starts, ends):
                d0, r0 = int(dst_ids[s0]), int(src_ids[s0])
                dst[d0:d0 + e0 - s0].copy_(src[r0:r0 + e0 - s0], non_blocking=True)
        elif dst.is_cuda:
            rows = torch.empty((n, src.shape[1]), dtype=src.dtype, pin_memory=True)
            np.take(src.numpy(), src_ids, axis=0, out=rows.numpy())
            dst.index_copy_(0, torch.from_numpy(dst_ids).pin_memory().to(dst.device, non_blocking=True),
                            rows.to(dst.device, non_blocking=True))
        else:
            dst.numpy()[dst_ids] = src.cpu().numpy()[src_ids]
        return
    wide = torch.int64 if dst.shape[1] % 8 == 0 else torch.uint8
    dst, src = dst.view(wide), src.view(wide)
    d_run, s_run = is_run(dst_ids), is_run(src_ids)
    if s_run:
        rows = src[int(src_ids[0]):int(src_ids[0]) + n]
    elif src.device == dst.device and d_run:
        torch.index_select(src, 0, torch.from_numpy(src_ids).to(src.device), out=dst[a:a + n])
        return
    else:
        rows = torch.index_select(src, 0, torch.from_numpy(src_ids).to(src.device))
    if d_run:
        dst[a:a + n].copy_(rows)
    else:
        dst.index_copy_(0, torch.from_numpy(dst_ids).to(dst.device), rows.to(dst.device))
