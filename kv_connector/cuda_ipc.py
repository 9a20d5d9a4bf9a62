"""CUDA IPC of one device tensor's memory: export a handle in one process, map it in another.

Through the CUDA libraries torch has already loaded, by ctypes (``cudaIpcGetMemHandle``,
``cudaIpcOpenMemHandle``, ``cudaIpcCloseMemHandle``; the driver's ``cuMemGetAddressRange`` for the
allocation's base): the 64-byte handle travels as hex in JSON, never pickled. A handle names a
whole ``cudaMalloc`` allocation, so an export carries the tensor's offset inside it. Memory from
CUDA's virtual memory API (torch's ``expandable_segments``) has no such handle: ``export`` raises,
and callers fall back to another path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch

_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess: a peer GPU's memory maps too


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # not c_char: that field would read back cut at a NUL


def _loaded(soname: str) -> str:
    """The path of a library this process has mapped (torch picks its CUDA major), else the soname."""
    torch.cuda.init()
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if soname in line.rsplit("/", 1)[-1]})
    return paths[0] if paths else (ctypes.util.find_library(soname.split(".")[0][3:]) or soname)


@functools.cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    rt, drv = ctypes.CDLL(_loaded("libcudart.so")), ctypes.CDLL(_loaded("libcuda.so"))
    rt.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_Handle), ctypes.c_void_p]
    rt.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _Handle, ctypes.c_uint]
    rt.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
    rt.cudaHostGetDevicePointer.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_uint]
    rt.cudaGetErrorString.argtypes = [ctypes.c_int]
    rt.cudaGetLastError.argtypes = []
    rt.cudaGetErrorString.restype = ctypes.c_char_p
    drv.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_uint64]
    return rt, drv


def _check(rc: int, what: str) -> None:
    if rc != 0:
        _libs()[0].cudaGetLastError()  # the runtime keeps the error for this thread: torch would report it next
        raise RuntimeError(f"{what} failed: {_libs()[0].cudaGetErrorString(rc).decode()} (cudaError {rc})")


def export(t: torch.Tensor) -> dict[str, Any]:
    """What another process on this machine needs to map ``t`` (contiguous, on a GPU): JSON-able."""
    rt, drv = _libs()
    with torch.cuda.device(t.device):
        h = _Handle()
        _check(rt.cudaIpcGetMemHandle(ctypes.byref(h), t.data_ptr()), "cudaIpcGetMemHandle")
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), t.data_ptr())
        if rc != 0:
            raise RuntimeError(f"cuMemGetAddressRange failed (CUresult {rc})")
    return {"handle": bytes(h.reserved).hex(), "offset": t.data_ptr() - base.value,
            "nbytes": t.numel() * t.element_size(), "device_uuid": str(torch.cuda.get_device_properties(t.device).uuid)}


class _CudaArray:
    """Enough of ``__cuda_array_interface__`` for torch.as_tensor to wrap a raw device pointer."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None, "stream": None}


class Mapping:
    """A peer's exported tensor, mapped into this process as a uint8 tensor (``.buf``)."""

    def __init__(self, exported: dict[str, Any], device: torch.device) -> None:
        rt, _ = _libs()
        self.export = exported
        h = _Handle.from_buffer_copy(bytes.fromhex(exported["handle"]))
        self.device = device
        self._base = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(rt.cudaIpcOpenMemHandle(ctypes.byref(self._base), h, _LAZY_ENABLE_PEER_ACCESS),
                   "cudaIpcOpenMemHandle")
            ptr = self._base.value + int(exported["offset"])
            # torch places it on the GPU that owns the memory (a peer's, across GPUs): no copy.
            self.buf = torch.as_tensor(_CudaArray(ptr, int(exported["nbytes"])))

    def close(self) -> None:
        """Unmap (the caller has synchronized every copy that read it)."""
        if self._base is not None:
            self.buf = None
            with torch.cuda.device(self.device):
                _check(_libs()[0].cudaIpcCloseMemHandle(self._base), "cudaIpcCloseMemHandle")
            self._base = None
