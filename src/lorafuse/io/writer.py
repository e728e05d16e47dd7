"""Low-level byte output shared by the writers (lorafuse/writers/), the kernels and the adapter writers: an
array's raw bytes, a complete ``pwrite``, and a file-to-file copy in the kernel."""

from __future__ import annotations

import os

import numpy as np

from ..errors import LorafuseError

__all__ = ["array_bytes", "copy_file_range", "pwrite_all"]

COPY_CHUNK = 64 << 20  # bytes per pread/pwrite where copy_file_range is refused


def array_bytes(array: np.ndarray) -> memoryview:
    """The raw little-endian bytes of an array, without a copy when it is contiguous."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``os.pwrite`` may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def copy_file_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes file-to-file in the kernel (no Python buffers); pread/pwrite where the kernel refuses."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError:
            n = 0
        if n <= 0:  # not supported here (e.g. across file systems): fall back to pread/pwrite
            chunk = os.pread(src_fd, min(COPY_CHUNK, nbytes - done), src_offset + done)
            if not chunk:
                raise LorafuseError("source file ended early while copying tensor data")
            n = os.pwrite(dst_fd, chunk, dst_offset + done)
        done += n
