"""``dst[dst_ids] = src[src_ids]`` for rows of bytes, in one Triton kernel, with either side in GPU
memory, in a peer's GPU memory mapped here (CUDA IPC), or in pinned host memory that the kernel
reaches over PCIe (``device_view``).

Why a kernel and not copies: a DMA per stretch of blocks costs a launch each (65,536 launches for
1 GB of 16 KiB blocks), and torch's index kernels need a gather into a temporary and a scatter
out of it (two passes over the bytes, plus one on the host when the rows sit in host memory). One
kernel gathers and scatters in a single pass whatever the block ids, and reads or writes pinned
host memory in place (docs/BENCHMARKS.md has the measurements that chose it).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
import triton
import triton.language as tl

from kv_connector import cuda_ipc

_CHUNK_BYTES = 16 << 10  # one program's share of a row: 16 KiB, so a small block is one program


@triton.jit
def _copy_rows_kernel(dst_ptr, src_ptr, dst_ids_ptr, src_ids_ptr, row_words, chunks_per_row,
                      CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pair = pid // chunks_per_row
    offs = (pid % chunks_per_row) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < row_words
    d = tl.load(dst_ids_ptr + pair)
    s = tl.load(src_ids_ptr + pair)
    v = tl.load(src_ptr + s * row_words + offs, mask=mask)
    tl.store(dst_ptr + d * row_words + offs, v, mask=mask)


def _words(t: torch.Tensor) -> torch.Tensor:
    """Rows of bytes as rows of the widest word that divides them (16-byte loads where it can)."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if t.shape[1] % size == 0:
            return t.view(dtype)
    return t


def copy_rows_kernel(dst: torch.Tensor, dst_ids: torch.Tensor, src: torch.Tensor, src_ids: torch.Tensor) -> None:
    """``dst[dst_ids] = src[src_ids]`` on [rows, row_bytes] uint8 CUDA tensors (a ``device_view`` of
    host memory counts), queued on the current stream. ``*_ids``: int64 on ``dst``'s GPU."""
    n = dst_ids.numel()
    if n == 0:
        return
    if src.shape[1] != dst.shape[1]:
        raise ValueError(f"rows of {src.shape[1]} bytes do not copy into rows of {dst.shape[1]}")
    dst_w, src_w = _words(dst), _words(src)
    row_words = dst_w.shape[1]
    chunk = min(triton.next_power_of_2(row_words), _CHUNK_BYTES // dst_w.element_size())
    chunks = triton.cdiv(row_words, chunk)
    # On the CPU only under TRITON_INTERPRET=1 (tests): there is no device to pick there.
    with torch.cuda.device(dst_ids.device) if dst_ids.is_cuda else contextlib.nullcontext():
        _copy_rows_kernel[(n * chunks,)](dst_w, src_w, dst_ids, src_ids, row_words, chunks, CHUNK=chunk,
                                         num_warps=8 if chunk * dst_w.element_size() >= 8192 else 4)


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host memory (``pin_memory`` or ``cudaHostRegister``) as a CUDA tensor of the same bytes,
    for kernels on ``device`` to read and write over PCIe. The host tensor must outlive the view."""
    if not host.is_contiguous():
        raise ValueError("device_view needs a contiguous host tensor")
    rt, _ = cuda_ipc._libs()
    ptr = ctypes.c_void_p()
    with torch.cuda.device(device):
        cuda_ipc._check(rt.cudaHostGetDevicePointer(ctypes.byref(ptr), ctypes.c_void_p(host.data_ptr()), 0),
                        "cudaHostGetDevicePointer (is the memory pinned?)")
        flat = torch.as_tensor(cuda_ipc._CudaArray(ptr.value, host.numel() * host.element_size()))
    return flat.view(host.dtype).view(host.shape)
