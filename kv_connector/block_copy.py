"""Copies of whole KV blocks (rows of bytes) between caches in any memory: GPU, host, or a peer's
memory mapped here (CUDA IPC, shared memory). Chosen by what was measured on an H200
(bench/block_copy.py, docs/BENCHMARKS.md): one DMA or one kernel beats a DMA per block; indices go
up to a GPU pinned, because a pageable copy waits for everything queued on its stream; on the host
a memcpy per run beats torch's CPU index kernels several times over.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Up to this many stretches of consecutive blocks move as one memcpy each between host caches; more
# take one gather, at CPU speed.
_MAX_COPIES = 256
# Into a GPU, stretches this long on average move one DMA each (one DMA moves 1 MiB at the link's
# rate); shorter ones take one kernel: 16 KiB blocks, a DMA each, moved 1.4-1.9 GB/s from pinned
# host memory on an H200 where the kernel moved 47-51 (bench/block_copy.py, docs/BENCHMARKS.md).
_DMA_STRETCH_BYTES = 1 << 20


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
        dst.copy_(blocks[ids_on(a, blocks.device)], non_blocking=True)
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

    GPU to GPU: one memcpy when both sides are one run; else, on one GPU (this process's memory or
    a peer's mapped over CUDA IPC), one ``block_copy_kernel`` that gathers and scatters in a single
    pass; across GPUs the gather runs where the rows are, then one copy over the link. Host to GPU:
    a DMA per stretch that is a run on both sides while stretches are long (a DMA moves 1 MiB at the
    link's rate), else the kernel, reading pinned host memory in place. Between host caches: a
    multi-threaded memcpy per stretch, or past ``_MAX_COPIES`` of them one gather (torch's CPU index
    kernels are several times slower)."""
    n = len(dst_ids)
    starts, ends = pair_runs(dst_ids, src_ids)
    if not dst.is_cuda:
        if len(starts) <= _MAX_COPIES:
            copy_stretches(dst, dst_ids, src, src_ids, starts, ends)
        else:
            dst.numpy()[dst_ids] = src.cpu().numpy()[src_ids]
        return
    if len(starts) == 1 or (not src.is_cuda and n * dst.shape[1] >= len(starts) * _DMA_STRETCH_BYTES):
        copy_stretches(dst, dst_ids, src, src_ids, starts, ends)
        return
    kernel = _kernel()
    if kernel is not None and (src.device == dst.device if src.is_cuda else src.is_pinned()):
        from kv_connector.block_copy_kernel import device_view

        rows = src if src.is_cuda else device_view(src, dst.device)
        kernel(dst, ids_on(dst_ids, dst.device), rows, ids_on(src_ids, dst.device))
        return
    if not src.is_cuda:  # no kernel reaches it: gather on the host, one DMA, one scatter
        rows = torch.empty((n, src.shape[1]), dtype=src.dtype, pin_memory=True)
        np.take(src.numpy(), src_ids, axis=0, out=rows.numpy())
        dst.index_copy_(0, ids_on(dst_ids, dst.device), rows.to(dst.device, non_blocking=True))
        return
    wide = torch.int64 if dst.shape[1] % 8 == 0 else torch.uint8
    dst, src = dst.view(wide), src.view(wide)
    rows = (src[int(src_ids[0]):int(src_ids[0]) + n] if is_run(src_ids)
            else torch.index_select(src, 0, ids_on(src_ids, src.device)))
    if is_run(dst_ids):
        dst[int(dst_ids[0]):int(dst_ids[0]) + n].copy_(rows)
    else:
        dst.index_copy_(0, ids_on(dst_ids, dst.device), rows.to(dst.device))


def copy_stretches(dst: torch.Tensor, dst_ids: np.ndarray, src: torch.Tensor, src_ids: np.ndarray,
                   starts: np.ndarray, ends: np.ndarray) -> None:
    """One copy per stretch (``pair_runs``): a DMA each where a GPU is involved."""
    for s0, e0 in zip(starts, ends):
        d0, r0 = int(dst_ids[s0]), int(src_ids[s0])
        dst[d0:d0 + e0 - s0].copy_(src[r0:r0 + e0 - s0], non_blocking=True)


def ids_on(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """Ids to a GPU, pinned first: a pageable copy would wait for everything queued on the stream."""
    return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).pin_memory().to(device, non_blocking=True)


@functools.cache
def _kernel():
    """``block_copy_kernel.copy_rows_kernel``, or None where Triton is not installed."""
    try:
        from kv_connector.block_copy_kernel import copy_rows_kernel
    except ImportError:
        return None
    return copy_rows_kernel
