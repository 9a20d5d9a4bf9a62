"""A POSIX shared-memory segment both engines of one machine map, pinned for DMA where a GPU uses it.

The consumer creates it (``/dev/shm/kvfabric-<pid>-<n>``), the producer maps it by name and unlinks
the name at once (``open(..., take_name=True)``): from then on nothing is left behind whichever side
dies, the kernel frees the memory with the last mapping. A segment whose creator died before that
moment is unlinked by the next ``create`` on the machine (its pid is in the name).

Pinning is ``cudaHostRegister`` on the mapping, so a GPU copies to and from it at the PCIe rate
with no bounce buffer — the reason this exists: UCX moves a peer's host memory into a GPU only
over TCP or through a CPU copy (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import re

import torch

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_PREFIX = "kvfabric-"
_NAME = re.compile(rf"^{_PREFIX}(\d+)-\d+$")
_counter = itertools.count()
# Pinned for every CUDA context of the process, not just the current one, and mapped into the GPUs'
# address space, so that kernels read and write it in place (block_copy_kernel.device_view).
_CUDA_HOST_REGISTER_FLAGS = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped
_CUDA_ERROR_ALREADY_REGISTERED = 712  # the pages are pinned through another mapping in this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(directory: str = SHM_DIR) -> list[str]:
    """Unlink segments whose creator is dead (it died between create and unlink). Returns their names."""
    gone = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                gone.append(name)
            except FileNotFoundError:
                pass
    if gone:
        logger.warning("unlinked %d shared-memory segments left by dead processes: %s", len(gone), gone)
    return gone


class ShmSegment:
    """``nbytes`` of shared memory as a uint8 tensor (``.buf``), optionally pinned for CUDA."""

    def __init__(self, name: str, nbytes: int, create: bool, pin: bool, directory: str = SHM_DIR) -> None:
        self.name, self.nbytes, self.path = name, nbytes, os.path.join(directory, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:  # reserve every page now: a full /dev/shm is an error here, not a SIGBUS mid-copy
                os.posix_fallocate(fd, 0, nbytes)
            elif os.fstat(fd).st_size != nbytes:
                raise ValueError(f"shared segment {name} has {os.fstat(fd).st_size} bytes, expected {nbytes}")
            self._mm = mmap.mmap(fd, nbytes)
        except BaseException:
            if create:
                os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.linked = create
        self.buf = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.pinned = False
        if pin:
            rc = int(torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), nbytes, _CUDA_HOST_REGISTER_FLAGS))
            if rc not in (0, _CUDA_ERROR_ALREADY_REGISTERED):
                self.close()
                raise RuntimeError(f"cudaHostRegister of shared segment {name} failed: cudaError {rc}")
            self.pinned = rc == 0

    @classmethod
    def create(cls, nbytes: int, pin: bool, directory: str = SHM_DIR) -> ShmSegment:
        sweep_orphans(directory)
        return cls(f"{_PREFIX}{os.getpid()}-{next(_counter)}", nbytes, create=True, pin=pin, directory=directory)

    @classmethod
    def open(cls, name: str, nbytes: int, pin: bool, directory: str = SHM_DIR,
             take_name: bool = False) -> ShmSegment:
        """``take_name``: the last process that will ever open it; the name goes now."""
        if not _NAME.match(name):
            raise ValueError(f"not a kvfabric shared segment name: {name!r}")
        seg = cls(name, nbytes, create=False, pin=pin, directory=directory)
        if take_name:
            seg.linked = True
            seg.unlink()
        return seg

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unpin and unmap (the caller has synchronized every copy that touched it)."""
        self.unlink()
        if self.pinned:
            self.pinned = False
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
        if self._mm is not None:
            self.buf = None  # the tensor exports the mmap's buffer: it must go before the map can close
            self._mm.close()
            self._mm = None
