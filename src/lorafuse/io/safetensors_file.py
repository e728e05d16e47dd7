"""Header-only view of a safetensors file; tensor bytes are read on demand with pread."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_TO_TORCH
from ..errors import InputError

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
MAX_HEADER_BYTES = 100 * 1024 * 1024


def is_lfs_pointer(path: Path) -> bool:
    """True when the file is a Git LFS pointer instead of the real content."""
    try:
        if path.stat().st_size > 1024:
            return False
        with open(path, "rb") as handle:
            return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def lfs_pointer_error(path: Path) -> InputError:
    return InputError(
        f"{path} is a Git LFS pointer, not the weights: install git-lfs and run `git lfs pull` in that repository"
    )


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header; checks that the file is long enough for every tensor it declares."""
    path = Path(path)
    if is_lfs_pointer(path):
        raise lfs_pointer_error(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is not a safetensors file (too short): re-download or re-export it")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
                raise InputError(f"{path} has a corrupt or truncated safetensors header: re-download or re-export it")
            raw = handle.read(header_len)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} has a corrupt safetensors header ({exc}): re-download or re-export it") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path} has a corrupt safetensors header: re-download or re-export it")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_TO_TORCH[entry["dtype"]]
            start, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except KeyError as exc:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype or a malformed header entry") from exc
        if data_start + end > size:
            raise InputError(
                f"{path} is truncated (tensor {name!r} ends at byte {data_start + end}, file has {size}): "
                "re-download or re-export it"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + start, end - start)
    return infos, {str(k): str(v) for k, v in metadata.items()}


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
    """Read one tensor into fresh memory owned by the returned tensor."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        view = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        pread_into(fd, view, info.offset, info.path)
    return out
