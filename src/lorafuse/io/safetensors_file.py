"""Header-only view of a safetensors file; tensor bytes are read on demand with pread."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arrays import dtype_of, nbytes_of
from ..dtypes import SAFETENSORS_TO_TORCH
from ..errors import InputError
from .byte_view import byte_view
from .safetensors_header import is_lfs_pointer, lfs_pointer_error, read_raw_header

__all__ = [
    "TensorInfo",
    "is_lfs_pointer",
    "lfs_pointer_error",
    "pread_into",
    "read_array",
    "read_header",
    "read_tensor",
]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int
    code: str = ""  # the safetensors dtype code ("BF16"...): arrays.dtype_of(code) is its numpy dtype

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
        if e.dtype not in SAFETENSORS_TO_TORCH:
            raise InputError(
                f"{path}: tensor {e.name!r} has dtype {e.dtype}, which lorafuse cannot read: "
                "convert the file to F32, F16 or BF16"
            )
        infos[e.name] = TensorInfo(e.name, path, SAFETENSORS_TO_TORCH[e.dtype], e.shape, e.offset, e.nbytes, e.dtype)
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


def read_tensor(info: TensorInfo, fd: int) -> torch.Tensor:
    """Read one tensor into fresh memory owned by the returned tensor (exactly its byte range, never beyond)."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if out.numel() * out.element_size() != info.nbytes:  # read_raw_header guarantees this; never read past
        raise InputError(f"{info.path}: tensor {info.name!r} has {info.nbytes} bytes, not dtype x shape")
    if info.nbytes:
        view = byte_view(out.view(-1).view(torch.uint8))
        pread_into(fd, view, info.offset, info.path)
    return out


def read_array(info: TensorInfo, fd: int) -> np.ndarray:
    """Read one tensor as a numpy array of its stored dtype, in fresh memory (exactly its byte range)."""
    dtype = dtype_of(info.code)
    if nbytes_of(dtype, info.shape) != info.nbytes:  # read_raw_header guarantees this; never read past
        raise InputError(f"{info.path}: tensor {info.name!r} has {info.nbytes} bytes, not dtype x shape")
    raw = np.empty(info.nbytes, dtype=np.uint8)
    if info.nbytes:
        pread_into(fd, memoryview(raw), info.offset, info.path)
    return raw.view(dtype).reshape(info.shape)
