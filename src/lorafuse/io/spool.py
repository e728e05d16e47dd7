"""A single-file tensor writer for outputs whose contents are only known at the end (extracted adapters).

Tensors are appended to a hidden spool file as they are produced (so memory stays at one tensor), and
:meth:`SpoolWriter.finish` writes the safetensors header followed by the spooled bytes, or a ``torch.save``
pickle for ``.pt``/``.pth`` outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .output import save_torch_file
from .safetensors_file import TensorInfo, read_tensor
from .writer import Slot, safetensors_header, tensor_bytes


class SpoolWriter:
    """Collects named tensors on disk, then writes them as one safetensors or pickle file."""

    def __init__(self, spool_path: Path):
        self.spool_path = Path(spool_path)
        self._fd = os.open(self.spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._entries: list[tuple[Slot, int]] = []  # slot, offset in the spool
        self._size = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor`` under ``name``; returns its size in bytes."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        tensor = tensor.detach().cpu().contiguous()
        data = tensor_bytes(tensor)
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self._size + done)
        slot = Slot(name, tensor.dtype, tuple(tensor.shape), len(data))
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

    def finish(self, path: Path, metadata: dict[str, str] | None = None, pickle: bool = False) -> None:
        """Write every tensor to ``path``: safetensors, or a ``torch.save`` pickle with ``pickle``."""
        path = Path(path)
        try:
            if pickle:
                self._finish_pickle(path)
            else:
                self._finish_safetensors(path, metadata)
        finally:
            self.close()

    def _finish_safetensors(self, path: Path, metadata: dict[str, str] | None) -> None:
        slots = [slot for slot, _ in self._entries]
        head = safetensors_header(slots, metadata)
        with open(path, "wb") as out:
            out.write(head)
            for slot, offset in self._entries:
                done = 0
                while done < slot.nbytes:
                    chunk = os.pread(self._fd, min(16 << 20, slot.nbytes - done), offset + done)
                    out.write(chunk)
                    done += len(chunk)
            out.flush()
            os.fsync(out.fileno())

    def _finish_pickle(self, path: Path) -> None:
        state = {}
        for slot, offset in self._entries:
            info = TensorInfo(slot.name, self.spool_path, slot.dtype, slot.shape, offset, slot.nbytes)
            state[slot.name] = read_tensor(info, self._fd)
        save_torch_file(state, path)  # a full disk is an OSError, not torch's RuntimeError

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.spool_path.exists():
            self.spool_path.unlink()
