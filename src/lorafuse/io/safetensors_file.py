"""Header-only view of a safetensors file; tensor bytes are read on demand with pread, into numpy arrays."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..arrays import CODE_TO_DTYPE, dtype_of, nbytes_of
from ..errors import InputError
from .safetensors_header import is_lfs_pointer, lfs_pointer_error, read_raw_header

__all__ = [
    "TensorInfo",
    "is_lfs_pointer",
    "lfs_pointer_error",
    "pread_into",
    "read_array",
    "read_elements",
    "read_header",
]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype code, shape and absolute byte range."""

    name: str
    path: Path
    code: str  # the safetensors dtype code ("BF16"...): ``dtype`` is its numpy dtype
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file; -1 for tensors of a pickled checkpoint
    nbytes: int

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the stored values (ml_dtypes for bf16 and fp8)."""
        return dtype_of(self.code)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header, validated as the safetensors library does (see :func:`read_raw_header`)."""
    path = Path(path)
    entries, metadata = read_raw_header(path)
    infos: dict[str, TensorInfo] = {}
    for e in entries:
        if e.dtype not in CODE_TO_DTYPE:
            raise InputError(
                f"{path}: tensor {e.name!r} has dtype {e.dtype}, which lorafuse cannot read: "
                "convert the file to F32, F16 or BF16"
            )
        infos[e.name] = TensorInfo(e.name, path, e.dtype, e.shape, e.offset, e.nbytes)
    return infos, metadata


def pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a short read means the file changed or is truncated."""
    done = 0
    total = len(buffer)
    while done < total:
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise InputError(f"{path} ended early while reading tensor data: the file is truncated")
        done += n


def read_array(info: TensorInfo, fd: int) -> np.ndarray:
    """Read one tensor as a numpy array of its stored dtype, in fresh memory (exactly its byte range)."""
    dtype = dtype_of(info.code)
    if nbytes_of(dtype, info.shape) != info.nbytes:  # read_raw_header guarantees this; never read past
        raise InputError(f"{info.path}: tensor {info.name!r} has {info.nbytes} bytes, not dtype x shape")
    raw = np.empty(info.nbytes, dtype=np.uint8)
    if info.nbytes:
        pread_into(fd, memoryview(raw), info.offset, info.path)
    return raw.view(dtype).reshape(info.shape)


def read_elements(info: TensorInfo, fd: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Elements ``start:stop`` of one tensor, flattened, in its stored dtype, read with one pread.

    ``out`` (uint8, at least that many bytes) is a reused buffer to read into; the result is a view of it.
    """
    dtype = dtype_of(info.code)
    if not 0 <= start <= stop <= info.numel:
        raise InputError(f"{info.path}: elements {start}:{stop} are outside tensor {info.name!r} ({info.numel})")
    nbytes = (stop - start) * dtype.itemsize
    raw = np.empty(nbytes, dtype=np.uint8) if out is None else out[:nbytes]
    if nbytes:
        pread_into(fd, memoryview(raw), info.offset + start * dtype.itemsize, info.path)
    return raw.view(dtype)
