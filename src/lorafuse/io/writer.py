"""Streaming writers: sharded safetensors (header first, then tensors one by one) and legacy .bin shards."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS
from ..errors import LorafuseError
from .byte_view import byte_view
from .layout import Slot, layout_shards, parse_size, shard_names, write_index
from .layout import safetensors_header as layout_header
from .splice import SpliceWriter

__all__ = ["SafetensorsShardWriter", "Slot", "layout_shards", "parse_size", "safetensors_header", "shard_names"]
__all__ += ["tensor_bytes", "write_index"]

SPLICE_MIN_BYTES = 64 << 10  # below this, one pwrite is cheaper than the pipe round trips


def safetensors_header(slots: list[Slot], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes for slots whose dtypes are torch dtypes."""
    return layout_header(slots, metadata, TORCH_TO_SAFETENSORS.__getitem__)


class SafetensorsShardWriter:
    """Writes pre-laid-out safetensors shards: headers at open, then each tensor at its offset."""

    def __init__(
        self,
        folder: Path,
        shards: list[list[Slot]],
        names: list[str],
        metadata: dict[str, str] | None = None,
        existing: bool = False,
    ):
        """``existing``: the files already hold exactly these headers and sizes (a prefill wrote them)."""
        self.paths = [folder / n for n in names]
        self.fds: list[int] = []
        for path, shard in zip(self.paths, shards):
            head = safetensors_header(shard, metadata)
            if existing:
                self.fds.append(os.open(path, os.O_WRONLY))
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
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
    return byte_view(tensor.contiguous().view(-1).view(torch.uint8))
