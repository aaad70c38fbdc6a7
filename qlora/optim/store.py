"""Backing stores for paged optimizer state: where a page lives while it is not resident.

CPU parameters: one preallocated file, read and written with pread/pwrite straight into the
resident buffers. The data then sits in the OS page cache (not in our RSS), and the kernel writes
it to disk when RAM runs short. (A memory-mapped file was tried first: copying through the mapping
and dropping it with MADV_DONTNEED measured 17-25 s/GB here, pread/pwrite 0.2-0.4 s/GB.)
CUDA parameters: pinned host memory; pages stream to the device on a side stream.

Both stores start zero-filled (the initial Adam state, in fp32 and in 8-bit codes alike).
"""

from __future__ import annotations

import mmap
import os
import shutil
import logging
import tempfile
import weakref

import torch

from ..errors import QloraError
from .state import fmt_bytes

log = logging.getLogger(__name__)

PAGE_ALIGN = mmap.PAGESIZE  # pages start on OS page boundaries (whole disk blocks per page)
_DISK_MARGIN = 64 * 2**20  # leave room for checkpoints written next to the backing file


class FileStore:
    """A preallocated file under `directory`, unlinked as soon as it is open so that a killed
    process leaves nothing behind."""

    def __init__(self, nbytes: int, directory: str):
        self._fd, self.path = _create_file(nbytes, directory)
        self.nbytes = nbytes
        self._close = weakref.finalize(self, os.close, self._fd)  # also if close() is never called

    def describe(self) -> str:
        return f"file {self.path} (deleted on open)"

    def alloc(self, nbytes: int) -> torch.Tensor:
        return anonymous_buffer(nbytes)

    def load_into(self, offset: int, page: torch.Tensor) -> None:
        view = memoryview(page.numpy())
        while len(view):  # pread may return fewer bytes than asked
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise OSError(f"unexpected end of {self.path}")
            view, offset = view[n:], offset + n

    def save(self, offset: int, page: torch.Tensor) -> None:
        view = memoryview(page.numpy())
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def read_cpu(self, offset: int, nbytes: int) -> torch.Tensor:
        out = torch.empty(nbytes, dtype=torch.uint8)
        self.load_into(offset, out)
        return out

    write_cpu = save

    def close(self) -> None:
        self._close()


class PinnedStore:
    """Pinned host memory for CUDA parameters; copies run on a side stream of the worker thread."""

    def __init__(self, nbytes: int, device: torch.device):
        self.device = device
        self.nbytes = nbytes
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
        self._stream = torch.cuda.Stream(device)

    def describe(self) -> str:
        return "pinned host memory"

    def alloc(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def load_into(self, offset: int, page: torch.Tensor) -> None:
        with torch.cuda.stream(self._stream):
            page.copy_(self._host[offset : offset + page.numel()], non_blocking=True)
        self._stream.synchronize()

    def save(self, offset: int, page: torch.Tensor) -> None:
        with torch.cuda.stream(self._stream):
            self._host[offset : offset + page.numel()].copy_(page, non_blocking=True)
        self._stream.synchronize()

    def read_cpu(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._host[offset : offset + nbytes].clone()

    def write_cpu(self, offset: int, data: torch.Tensor) -> None:
        self._host[offset : offset + data.numel()].copy_(data)

    def close(self) -> None:
        self._host = torch.empty(0, dtype=torch.uint8)


def anonymous_buffer(nbytes: int) -> torch.Tensor:
    """uint8 CPU memory mapped straight from the OS and unmapped when the tensor dies. Pages come
    and go every step; through malloc, freed pages would stay in its arenas and in our RSS."""
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=torch.uint8)


def _create_file(nbytes: int, directory: str) -> tuple[int, str]:
    """An open, already unlinked file of `nbytes` under `directory` -> (fd, the path it had).
    All its blocks are allocated now, so a full disk shows up here, before training, and not as
    a failed write mid-run."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="qlora-optim-", suffix=".state", dir=directory)
    except OSError as e:
        raise QloraError(
            f"optimizer offload dir {directory}: cannot create the state file ({e.strerror}); "
            "pass a writable directory as offload_dir"
        ) from None
    if _on_ram_filesystem(directory):
        log.warning("optimizer offload dir %s is on a RAM filesystem (tmpfs): paging there saves no "
                    "memory; pass an offload_dir on a disk", directory)
    try:
        os.unlink(path)
        free = shutil.disk_usage(directory).free
        if free < nbytes + _DISK_MARGIN:
            raise QloraError(
                f"optimizer offload dir {directory}: needs {fmt_bytes(nbytes)} for paged optimizer state "
                f"(+{fmt_bytes(_DISK_MARGIN)} margin) but only {fmt_bytes(free)} is free; free disk space, "
                "choose another offload_dir, raise the memory budget or use an 8-bit optimizer"
            )
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
        else:
            os.ftruncate(fd, nbytes)
    except OSError as e:
        os.close(fd)
        raise QloraError(
            f"optimizer offload dir {directory}: cannot allocate {fmt_bytes(nbytes)} for paged optimizer "
            f"state ({e.strerror}); free disk space or choose another offload_dir"
        ) from None
    except QloraError:
        os.close(fd)
        raise
    return fd, path


def _on_ram_filesystem(directory: str) -> bool:
    """Whether `directory` is on tmpfs/ramfs, from the longest matching mount point (Linux)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return False
    path = os.path.realpath(directory)
    best, fstype = "", ""
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, fstype = point, kind
    return fstype in ("tmpfs", "ramfs")
