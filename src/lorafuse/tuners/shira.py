"""PEFT SHiRA: W[rows, cols] += values, a sparse update at saved positions (``shira_indices``), Linear layers only.

PEFT builds ``torch.sparse_coo_tensor(indices, values * scaling)`` and adds it; a position saved twice adds twice,
as a sparse tensor sums duplicates. ``scaling`` is 1.0 in every SHiRA layer PEFT builds (set_scale is not saved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..arrays import F32
from ..edits import Array, BlockOps, Edit, TargetedEdit, TensorRef
from ..errors import AdapterError
from .peft_layer import as_numpy
from .registry import Tuner, TunerInput, register_tuner


@dataclass(frozen=True)
class SparseDelta(Edit):
    """W[indices[0], indices[1]] += scale * values on an (out, in) weight, row block by row block."""

    values: TensorRef
    indices: TensorRef
    scale: float = 1.0

    def refs(self) -> list[TensorRef]:
        return [self.values]

    def _positions(self) -> np.ndarray:
        # read as fp32 (TensorRef.load), exact for any index below 2**24, far beyond a layer's width
        return as_numpy(self.indices.load()).astype(np.int64).reshape(2, -1)

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        if conv1d:  # PEFT's SHiRA wraps nn.Linear only: its positions are (out, in)
            raise AdapterError(
                f"{self.adapter}: {self.source_key!r} targets a GPT-2 Conv1D layer, which PEFT's SHiRA does not take; "
                "is this the base model the adapter was trained on?"
            )
        return self

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2:
            return f"SHiRA updates Linear weights, not one of shape {tuple(shape)}"
        if len(self.indices.shape) != 2 or self.indices.shape[0] != 2:
            return f"shira_indices has shape {self.indices.shape}, not (2, n)"
        if self.indices.shape[1] != int(np.prod(self.values.shape)):
            return f"{self.indices.shape[1]} positions for {int(np.prod(self.values.shape))} shira_weight values"
        positions = self._positions()
        if positions.size and (positions.min() < 0 or positions[0].max() >= shape[0] or positions[1].max() >= shape[1]):
            return f"shira_indices reach outside the {shape[0]}x{shape[1]} weight"
        return None

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        positions, values = ops.cached(self, "sparse", self._sorted)
        lo, hi = np.searchsorted(positions[0], [rows.start, rows.stop])
        if lo == hi:
            return
        update = np.zeros((rows.stop - rows.start, block.shape[1]), dtype=F32)
        np.add.at(update, (positions[0, lo:hi] - rows.start, positions[1, lo:hi]), values[lo:hi])
        block += ops.array(update)

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions sorted by row (a block takes its own share) and the scaled values in that order."""
        positions = self._positions()
        values = as_numpy(self.values.load()).reshape(-1) * np.float32(self.scale)
        order = np.argsort(positions[0], kind="stable")
        return positions[:, order], values[order]

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": "shira", "scale": self.scale, "values": int(np.prod(self.values.shape))}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not load(self.values).any()


def read_shira(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every SHiRA module's sparse update, and module -> number of values."""
    edits: list[TargetedEdit] = []
    sizes: dict[str, int] = {}
    for module, slots in tuner_input.modules.items():
        values_key, indices_key = slots.get("shira_weight"), slots.get("shira_indices")
        if values_key is None or indices_key is None:
            raise AdapterError(
                f"{tuner_input.source}: SHiRA module {module!r} needs shira_weight and shira_indices, and has "
                f"{sorted(slots)}; the adapter file is incomplete"
            )
        values = TensorRef(tuner_input.checkpoint, values_key)
        indices = TensorRef(tuner_input.checkpoint, indices_key)
        edit = SparseDelta(values, indices, adapter=tuner_input.label, source_key=values_key)
        edits.append(TargetedEdit(f"{module}.weight", edit))
        sizes[module] = int(np.prod(values.shape))
    return edits, sizes


TUNER = register_tuner(
    Tuner(
        "SHIRA",
        ("shira_weight", "shira_indices"),
        read_shira,
        description="W[i, j] += values at saved positions (sparse)",
        extra={"layers": ("linear",)},
    )
)
