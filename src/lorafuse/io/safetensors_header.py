"""Torch-free reading of safetensors headers: JSON entries in file order, checked against the file size.

The CLI reads headers before ``import torch`` (see prefill.py), so nothing here may import torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

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
class RawEntry:
    """One tensor as the header declares it: safetensors dtype code, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_raw_header(path: Path) -> tuple[list[RawEntry], dict[str, str]]:
    """Parse a safetensors header: entries in header order and metadata; a truncated file is an error."""
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
    entries: list[RawEntry] = []
    for name, entry in header.items():
        try:
            dtype = str(entry["dtype"])
            start, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}: tensor {name!r} has a malformed header entry: re-download or re-export it"
            ) from exc
        if data_start + end > size:
            raise InputError(
                f"{path} is truncated (tensor {name!r} ends at byte {data_start + end}, file has {size}): "
                "re-download or re-export it"
            )
        entries.append(RawEntry(name, dtype, shape, data_start + start, end - start))
    return entries, {str(k): str(v) for k, v in metadata.items()}
