"""Legacy ``pytorch_model*.bin`` shards, or one ``.pt``/``.bin`` pickle (torch.save, ``weights_only`` loadable;
needs the torch extra)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..arrays import dtype_of
from ..errors import LorafuseError
from ..io.layout import Slot
from ..io.output import save_torch_file
from .base import ModelWriter, ShardLayout

if TYPE_CHECKING:
    from ..io.prefill import Prefill


class BinWriter(ModelWriter):
    """``pytorch_model.bin`` or ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``."""

    name = "bin"
    suffix = ".bin"
    needs_torch = "--format bin (.bin shards are PyTorch pickles; safetensors needs no torch)"

    def shard_prefix(self, prefix: str) -> str:
        return "pytorch_model" if prefix == "model" else prefix  # as transformers names .bin shards

    def open(
        self,
        folder: Path,
        layout: ShardLayout,
        metadata: dict[str, str] | None = None,
        prefill: Prefill | None = None,
    ) -> BinShardSink:
        return BinShardSink(folder, layout.shards, layout.names)  # a pickle holds no metadata strings


class BinShardSink:
    """A shard's tensors are held in memory until the last of them is written, then the shard is saved
    (torch.save needs them all at once)."""

    def __init__(self, folder: Path, shards: list[list[Slot]], names: list[str]):
        self.paths = [folder / n for n in names]
        self._shards = shards
        self._buffers: dict[str, np.ndarray] = {}
        self._left = [sum(s.nbytes for s in shard) for shard in shards]
        self._lock = threading.Lock()
        for index, left in enumerate(self._left):
            if left == 0:
                self._save(index)

    def holds(self, slot: Slot, path: Path, offset: int) -> bool:
        return False

    def _buffer(self, slot: Slot) -> np.ndarray:
        with self._lock:
            if slot.name not in self._buffers:
                self._buffers[slot.name] = np.empty(slot.nbytes, dtype=np.uint8)
            return self._buffers[slot.name]

    def _done(self, slot: Slot, nbytes: int) -> None:
        with self._lock:
            self._left[slot.shard] -= nbytes
            # saved once, when its last byte arrives: an empty tensor written after that must not save it again
            complete = nbytes > 0 and self._left[slot.shard] == 0
        if complete:
            self._save(slot.shard)

    def write(self, slot: Slot, data: memoryview, at: int = 0) -> None:
        self._buffer(slot)[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._done(slot, len(data))

    def copy(self, slot: Slot, src_fd: int, src_offset: int) -> None:
        buffer = self._buffer(slot)
        done = 0
        while done < slot.nbytes:
            n = os.preadv(src_fd, [memoryview(buffer)[done:]], src_offset + done)
            if n <= 0:
                raise LorafuseError("source file ended early while copying tensor data")
            done += n
        self._done(slot, slot.nbytes)

    def _save(self, index: int) -> None:
        from ..torch_bridge import to_torch

        state = {}
        for slot in self._shards[index]:
            raw = self._buffers.pop(slot.name, np.empty(0, dtype=np.uint8))
            state[slot.name] = to_torch(raw.view(dtype_of(slot.dtype)).reshape(slot.shape))
        save_torch_file(state, self.paths[index])  # a full disk is an OSError, not torch's RuntimeError

    def close(self) -> None:
        self._buffers.clear()
