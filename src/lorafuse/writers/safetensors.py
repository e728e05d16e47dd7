"""Sharded safetensors with a transformers-style index, or one safetensors file: headers first, then each
tensor's bytes at their offsets (the kernel writes row blocks in place, from several threads)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.layout import Slot, safetensors_header
from ..io.splice import FreshPageWriter
from ..io.writer import copy_file_range, pwrite_all
from .base import ModelWriter, ShardLayout

if TYPE_CHECKING:
    from ..io.prefill import Prefill


class SafetensorsWriter(ModelWriter):
    """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""

    name = "safetensors"
    suffix = ".safetensors"
    uses_prefill = True

    def prefill_headers(self, layout: ShardLayout) -> list[bytes]:
        return [safetensors_header(shard) for shard in layout.shards]  # as io/prefill.py writes them

    def open(
        self,
        folder: Path,
        layout: ShardLayout,
        metadata: dict[str, str] | None = None,
        prefill: Prefill | None = None,
    ) -> SafetensorsShardSink:
        return SafetensorsShardSink(folder, layout.shards, layout.names, metadata, prefill)


class SafetensorsShardSink:
    """Writes pre-laid-out safetensors shards: headers at open, then each tensor's bytes at their offsets.

    ``prefill`` (io/prefill.py): the files already hold exactly these headers and sizes and the base's bytes of
    every tensor; writes of a slot wait until the prefill has copied it (else the copy would overwrite them), and
    go by ``pwrite`` over the existing pages. Fresh files are written through a pipe (io/splice.py: 2-5x less
    kernel time than ``pwrite`` into fresh page cache), one pipe per writing thread.
    """

    def __init__(
        self,
        folder: Path,
        shards: list[list[Slot]],
        names: list[str],
        metadata: dict[str, str] | None = None,
        prefill: Prefill | None = None,
    ):
        self.paths = [folder / n for n in names]
        self.prefill = prefill
        self.fds: list[int] = []
        self._fresh = FreshPageWriter()
        try:
            for path, shard in zip(self.paths, shards):
                if prefill is not None:
                    self.fds.append(os.open(path, os.O_WRONLY))
                    continue
                head = safetensors_header(shard, metadata)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self.fds.append(fd)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, len(head) + sum(s.nbytes for s in shard))
        except BaseException:
            self.close()
            raise

    def holds(self, slot: Slot, path: Path, offset: int) -> bool:
        """True when ``slot`` already receives the bytes at ``offset`` of ``path`` (the prefill copies them)."""
        return self.prefill is not None and self.prefill.holds(slot.name, path, offset)

    def write(self, slot: Slot, data: memoryview, at: int = 0) -> None:
        """Write ``data`` at byte ``at`` of ``slot`` (safe from several threads: slots and pieces never overlap)."""
        if not self._over_prefill(slot, data, at):
            self._fresh.write(self.fds[slot.shard], data, slot.offset + at)

    def submit(self, slot: Slot, data: memoryview, at: int = 0) -> threading.Event | None:
        """:meth:`write` by the writer thread where the pages are fresh (io/splice.py): returns the event set once
        ``data`` is written (it must not change until then), or None when written here already."""
        if self._over_prefill(slot, data, at):
            return None
        return self._fresh.submit(self.fds[slot.shard], data, slot.offset + at)

    def _over_prefill(self, slot: Slot, data: memoryview, at: int) -> bool:
        """Once the prefill has passed ``slot`` (it must not copy base bytes over what is written here): where it
        copied the slot, write ``data`` over those existing pages with pwrite (as measured with the prefill) and
        return True; False where the pages are fresh."""
        if self.prefill is None:
            return False
        self.prefill.wait_for(slot.name)
        if self.prefill.skipped(slot.name):
            return False
        pwrite_all(self.fds[slot.shard], data, slot.offset + at)
        return True

    def flush(self) -> None:
        """Wait for every submitted write; raise a failed one."""
        self._fresh.flush()

    def copy(self, slot: Slot, src_fd: int, src_offset: int) -> None:
        """Copy an untouched tensor's bytes file-to-file."""
        copy_file_range(src_fd, src_offset, self.fds[slot.shard], slot.offset, slot.nbytes)

    def close(self) -> None:
        # No fsync, as cp and save_pretrained: forcing gigabytes to disk here would make the merge run at disk
        # speed. The output folder still appears only complete (atomic rename); flushing is left to the OS.
        self._fresh.close()  # before the files: its thread may be writing into them
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
