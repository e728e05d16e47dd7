"""The interface every output format implements (torchtune's checkpointer idea): a :class:`ModelWriter` lays out
the output tensors in files and opens a :class:`TensorSink` the kernel writes their bytes into.

The kernel knows nothing of files: it hands each tensor's bytes (row blocks, from several threads) or a
file-to-file copy to the sink at the :class:`~lorafuse.io.layout.Slot` the writer laid out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from ..io.layout import Slot, layout_shards, shard_names, write_index

if TYPE_CHECKING:
    from ..io.prefill import Prefill

ONE_FILE = 1 << 62  # a shard limit no model reaches: everything in one file


class TensorSink(Protocol):
    """Where a kernel puts a tensor's bytes; safe from several threads (slots and pieces never overlap)."""

    def holds(self, slot: Slot, path: Path, offset: int) -> bool:
        """True when ``slot`` already receives the bytes at ``offset`` of ``path`` (nothing to copy)."""
        ...

    def write(self, slot: Slot, data: memoryview, at: int = 0) -> None:
        """Write ``data`` at byte ``at`` of ``slot``."""
        ...

    def copy(self, slot: Slot, src_fd: int, src_offset: int) -> None:
        """Copy an untouched tensor's ``slot.nbytes`` bytes from ``src_fd`` at ``src_offset``."""
        ...

    def close(self) -> None: ...


@dataclass
class ShardLayout:
    """The files of one output: each shard's slots (in file order), the file names, the index file (if any)."""

    shards: list[list[Slot]]
    names: list[str]
    index_name: str | None

    @property
    def slots(self) -> list[Slot]:
        return [slot for shard in self.shards for slot in shard]

    @property
    def files(self) -> list[str]:
        """Every file written: the shards, then their index."""
        return self.names + ([self.index_name] if self.index_name else [])


class ModelWriter(ABC):
    """One output format, registered by :attr:`name` (``--format``) in :mod:`lorafuse.writers`."""

    name: ClassVar[str]
    suffix: ClassVar[str]  # of shard files, e.g. ".safetensors"
    needs_torch: ClassVar[str | None] = None  # what to say when torch is missing; None: torch-free
    uses_prefill: ClassVar[bool] = False  # whether a prefilled copy of the base (io/prefill.py) can become its files

    def check_available(self) -> None:
        """One-line error naming the extra to install when this format needs torch and it is missing."""
        if self.needs_torch is not None:
            from ..torch_bridge import require_torch

            require_torch(self.needs_torch)

    def shard_prefix(self, prefix: str) -> str:
        """The shard file prefix for a base whose weights are ``prefix``-named (``model``)."""
        return prefix

    def layout(
        self, slots: list[Slot], prefix: str, max_shard_size: int, single_name: str | None = None
    ) -> ShardLayout:
        """Shards of at most ``max_shard_size`` bytes (greedy, in order) named as transformers names them, with an
        index when there are several; ``single_name``: everything in that one file."""
        shards = layout_shards(slots, ONE_FILE if single_name is not None else max_shard_size)
        if single_name is not None:
            return ShardLayout(shards, [single_name], None)
        prefix = self.shard_prefix(prefix)
        names = shard_names(prefix, len(shards), self.suffix)
        return ShardLayout(shards, names, f"{prefix}{self.suffix}.index.json" if len(names) > 1 else None)

    def prefill_headers(self, layout: ShardLayout) -> list[bytes] | None:
        """The header bytes a prefill of this layout must have written (and sets each slot's offset), for a format
        that :attr:`uses_prefill`; None for the others."""
        return None

    @abstractmethod
    def open(
        self,
        folder: Path,
        layout: ShardLayout,
        metadata: dict[str, str] | None = None,
        prefill: Prefill | None = None,
    ) -> TensorSink:
        """Create the layout's files in ``folder`` and return the sink the kernel writes into. ``metadata``: strings
        a format that holds them stores in each file; ``prefill``: the base already copied into ``folder``
        (io/prefill.py), for formats that can use it (:attr:`uses_prefill`)."""

    def finish(self, folder: Path, layout: ShardLayout) -> None:
        """After every tensor is written: the index mapping each tensor to its shard, when there are several."""
        if layout.index_name:
            write_index(folder / layout.index_name, layout.slots, layout.names)
