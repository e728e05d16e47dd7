"""Streaming writers: sharded safetensors (header first, then tensors one by one) and legacy .bin shards."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS
from ..errors import LorafuseError
from .splice import SpliceWriter

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.I)
UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000 (as transformers reads max_shard_size); ints pass through."""
    if isinstance(size, int):
        return size
    match = SIZE_RE.match(str(size))
    if not match or (match.group(2) or "").upper() not in UNITS:
        raise LorafuseError(f"cannot read size {size!r}: use a number with a unit, e.g. 5GB or 500MB")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "").upper()])


SPLICE_MIN_BYTES = 64 << 10  # below this, one pwrite is cheaper than the pipe round trips


@dataclass
class Slot:
    """Where one output tensor goes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    offset: int = 0  # absolute offset in the shard file (safetensors)


def layout_shards(slots: list[Slot], max_shard_size: int) -> list[list[Slot]]:
    """Greedy sharding in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Slot]] = [[]]
    size = 0
    for slot in slots:
        if shards[-1] and size + slot.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
        slot.shard = len(shards) - 1
    return shards


def shard_names(prefix: str, count: int, suffix: str) -> list[str]:
    if count == 1:
        return [f"{prefix}{suffix}"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}{suffix}" for i in range(count)]


def safetensors_header(slots: list[Slot], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix + JSON padded to 8 bytes) for tensors written in the given order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for slot in slots:
        header[slot.name] = {
            "dtype": TORCH_TO_SAFETENSORS[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    for slot, entry in zip(slots, (header[s.name] for s in slots)):
        slot.offset = len(head) + entry["data_offsets"][0]  # type: ignore[index]
    return head


def write_index(path: Path, slots: list[Slot], names: list[str], metadata: dict | None = None) -> None:
    """A transformers-style ``*.index.json`` mapping every tensor to its shard file."""
    total = sum(s.nbytes for s in slots)
    weight_map = {s.name: names[s.shard] for s in slots}
    body = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(body, indent=2) + "\n")


class SafetensorsShardWriter:
    """Writes pre-laid-out safetensors shards: headers at open, then each tensor at its offset."""

    def __init__(
        self, folder: Path, shards: list[list[Slot]], names: list[str], metadata: dict[str, str] | None = None
    ):
        self.paths = [folder / n for n in names]
        self.fds: list[int] = []
        for path, shard in zip(self.paths, shards):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            head = safetensors_header(shard, metadata)
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + sum(s.nbytes for s in shard))
        try:
            self._splice: SpliceWriter | None = SpliceWriter()
        except OSError:
            self._splice = None

    def write_bytes(self, slot: Slot, data: memoryview) -> None:
        """Write one tensor's bytes at its offset (from one thread at a time)."""
        fd = self.fds[slot.shard]
        if self._splice is not None and not data.readonly and len(data) >= SPLICE_MIN_BYTES:
            try:
                self._splice.write(fd, data, slot.offset)
                return
            except (OSError, TypeError, ValueError):  # refused here: rewrite the whole tensor with pwrite
                self._splice.close()
                self._splice = None
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], slot.offset + done)

    def copy_range(self, slot: Slot, src_fd: int, src_offset: int) -> None:
        """Copy untouched tensor bytes file-to-file in the kernel (no Python buffers)."""
        fd = self.fds[slot.shard]
        done = 0
        while done < slot.nbytes:
            try:
                n = os.copy_file_range(src_fd, fd, slot.nbytes - done, src_offset + done, slot.offset + done)
            except OSError:
                n = 0
            if n <= 0:  # not supported here (e.g. across file systems): fall back to pread/pwrite
                chunk = os.pread(src_fd, min(64 << 20, slot.nbytes - done), src_offset + done)
                if not chunk:
                    raise LorafuseError("source file ended early while copying tensor data")
                n = os.pwrite(fd, chunk, slot.offset + done)
            done += n

    def close(self) -> None:
        # No fsync, as cp and save_pretrained: forcing gigabytes to disk here would make the merge run at disk
        # speed. The output folder still appears only complete (atomic rename); flushing is left to the OS.
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if self._splice is not None:
            self._splice.close()
            self._splice = None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous tensor, without a copy."""
    flat = tensor.contiguous().view(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
