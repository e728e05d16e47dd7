"""A single-file tensor writer for outputs whose contents are only known at the end (extracted adapters).

Tensors are appended to a hidden spool file as they are produced (so memory stays at one tensor); at the end
:meth:`SpoolWriter.arrays` hands them to the one safetensors writer (formats/peft_writer.py), or
:meth:`SpoolWriter.finish_pickle` writes a ``torch.save`` pickle for ``.pt``/``.pth`` outputs (the torch extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import code_of, dtype_of
from .layout import Slot
from .output import save_torch_file
from .safetensors_file import pread_into
from .writer import array_bytes


class SpoolWriter:
    """Collects named tensors on disk, then writes them as one safetensors or pickle file."""

    def __init__(self, spool_path: Path):
        self.spool_path = Path(spool_path)
        self._fd = os.open(self.spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._entries: list[tuple[Slot, int]] = []  # slot, offset in the spool
        self._size = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: Any) -> int:
        """Append ``tensor`` (a numpy array; a torch tensor crosses through torch_bridge) under ``name``; returns its
        size in bytes."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        if not isinstance(tensor, np.ndarray):
            from ..torch_bridge import to_numpy

            tensor = to_numpy(tensor)
        data = array_bytes(tensor)
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self._size + done)
        slot = Slot(name, code_of(tensor.dtype), tuple(tensor.shape), len(data))
        self._entries.append((slot, self._size))
        self._size += len(data)
        return len(data)

    def discard(self, name: str) -> None:
        """Leave the tensor ``name`` out of the final file."""
        self._entries = [(slot, offset) for slot, offset in self._entries if slot.name != name]
        self._names.discard(name)

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot, _ in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return [slot.name for slot, _ in self._entries]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every kept tensor as a read-only array over the spool file (memory-mapped: one tensor at a time is
        paged in while a writer copies them out), for formats/peft_writer.py."""
        if not self._entries:
            return {}
        whole = np.memmap(self.spool_path, dtype=np.uint8, mode="r", shape=(max(self._size, 1),))
        return {
            slot.name: whole[offset : offset + slot.nbytes].view(dtype_of(slot.dtype)).reshape(slot.shape)
            for slot, offset in self._entries
        }

    def finish_pickle(self, path: Path) -> None:
        """Write every tensor to ``path`` as a ``torch.save`` pickle (the torch extra), then drop the spool."""
        try:
            self._finish_pickle(path)
        finally:
            self.close()

    def _finish_pickle(self, path: Path) -> None:
        from ..torch_bridge import require_torch, to_torch

        require_torch(f"writing {path.name} (a PyTorch pickle)")
        state = {}
        for slot, offset in self._entries:
            raw = np.empty(slot.nbytes, dtype=np.uint8)
            pread_into(self._fd, memoryview(raw), offset, self.spool_path)
            state[slot.name] = to_torch(raw.view(dtype_of(slot.dtype)).reshape(slot.shape))
        save_torch_file(state, path)  # a full disk is an OSError, not torch's RuntimeError

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.spool_path.exists():
            self.spool_path.unlink()
