"""Low-level byte output shared by the writers (lorafuse/writers/), the kernels and the adapter writers: an
array's raw bytes, a complete ``pwrite``, and a file-to-file copy in the kernel, each taking turns per file.

Threads that write into one file at the same moment contend for its inode lock in the kernel, which spins for it
(ext4's ``rwsem_spin_on_owner``): two threads writing fresh pages of one file took 1.4x the time and 2x the CPU of
one thread. Every write here therefore holds the file's lock in this process (:func:`file_lock`) for one bounded
piece, so a waiting thread sleeps instead of spinning and the cores stay with the merge math.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import LorafuseError

__all__ = ["array_bytes", "copy_file_range", "file_lock", "pwrite_all"]

TURN_BYTES = 8 << 20  # most bytes written per turn holding a file's lock: others wait a few milliseconds at most

_FILE_LOCKS: dict[tuple[int, int], threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def file_lock(fd: int) -> threading.Lock:
    """The lock every write into the file open as ``fd`` holds (one per device and inode in this process)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(key)
        if lock is None:
            lock = _FILE_LOCKS[key] = threading.Lock()
        return lock


def array_bytes(array: np.ndarray) -> memoryview:
    """The raw little-endian bytes of an array, without a copy when it is contiguous."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``os.pwrite`` may write less than asked), taking turns."""
    lock, done = file_lock(fd), 0
    while done < len(data):
        with lock:
            done += os.pwrite(fd, data[done : done + TURN_BYTES], offset + done)


def copy_file_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes file-to-file in the kernel (no Python buffers), taking turns; pread/pwrite where it refuses."""
    lock, done = file_lock(dst_fd), 0
    while done < nbytes:
        done += copy_piece(src_fd, src_offset + done, dst_fd, dst_offset + done, nbytes - done, lock)


def copy_piece(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int, lock: threading.Lock) -> int:
    """Copy up to ``nbytes`` (at most one turn's worth) holding ``lock`` (the destination's :func:`file_lock`);
    returns the bytes copied."""
    size = min(nbytes, TURN_BYTES)
    with lock:
        try:
            n = os.copy_file_range(src_fd, dst_fd, size, src_offset, dst_offset)
        except OSError:
            n = 0
        if n > 0:
            return n
        chunk = os.pread(src_fd, size, src_offset)  # refused here (e.g. across file systems)
        if not chunk:
            raise LorafuseError("source file ended early while copying tensor data")
        return os.pwrite(dst_fd, chunk, dst_offset)
