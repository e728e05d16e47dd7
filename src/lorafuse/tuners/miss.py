"""PEFT MiSS (formerly Bone), on Linear layers: a shared block added to every r-column slice of the weight.

``miss_block`` is saved in one of three layouts, chosen by ``init_weights`` in the config, as PEFT chooses:

- default (``init_weights`` true or false): B (r, out); W[o, c] += B[c % r, o] (the last, partial slice of
  columns when r does not divide ``in`` gets B's first rows);
- ``"mini"``: B (r, mini_r), repeated along the outputs to (r, out) (B[k, o % mini_r]), then as the default;
- ``"bat"``: B (out / r, r, r); each r x r block W_ij of the weight (row block i, column block j) becomes
  W_ij (I + B_i) + B_i (r must divide both ``in`` and ``out``).

The first two do not depend on W: W += B_full^T @ T, T (r, in) the 0/1 matrix with T[k, c] = (c % r == k), so a
block of rows costs one rank-r product. ``"bat"`` reads W: each row uses the block B_i of its row block. Biases
are not touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..arrays import F32
from ..edits import Array, BlockOps, Edit, TargetedEdit, TensorRef
from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME, _shown, positive_int
from .orthogonal import InputTransform, module_slot
from .registry import Tuner, TunerInput, register_tuner

MISS_PARAMS = ("miss_block",)


def tiling(rank: int, inputs: int) -> np.ndarray:
    """T (rank, inputs) with T[k, c] = 1 where c % rank == k: x @ T repeats x's ``rank`` columns along ``inputs``."""
    out = np.zeros((rank, inputs), dtype=F32)
    columns = np.arange(inputs)
    out[columns % rank, columns] = 1
    return out


@dataclass(frozen=True)
class MissDelta(Edit):
    """W += B_full^T @ T (MiSS's default and ``"mini"`` layouts, see the module docstring); ``mini``: B is
    (r, mini_r), repeated along the outputs."""

    B: TensorRef
    mini: bool = False
    scale: float = field(default=1.0, kw_only=True)
    on_conv1d: bool = field(default=False, kw_only=True)

    def refs(self) -> list[TensorRef]:
        return [self.B]

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        def make() -> tuple[Array, Array]:
            left = np.ascontiguousarray(np.asarray(self.B.load(), dtype=F32).reshape(self.B.shape).T)
            left *= np.float32(self.scale)
            return ops.array(left), ops.array(tiling(self.B.shape[0], block.shape[1]))

        left, right = ops.cached(self, "factors", make)  # B^T (out or mini_r, r), T
        # "mini": output o takes B's column o % mini_r
        picked = left[np.arange(rows.start, rows.stop) % self.B.shape[1]] if self.mini else left[rows]
        block += ops.product(picked, right)

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        return replace(self, on_conv1d=True) if conv1d else self

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        rank, width = self.B.shape
        if self.on_conv1d:
            return "PEFT's MiSS does not wrap GPT-2 Conv1D layers (only Linear layers)"
        if len(shape) != 2:
            return f"MiSS changes Linear weights, not a tensor of shape {tuple(shape)}"
        if rank > shape[1]:
            return f"miss_block has r={rank}, more than the base tensor's {shape[1]} inputs"
        if (shape[0] % width) if self.mini else (width != shape[0]):
            return f"miss_block's {width} columns do not fit the base tensor's {shape[0]} outputs"
        return None

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        layout = "mini" if self.mini else "default"
        return {"kind": "miss", "layout": layout, "r": self.B.shape[0], "scale": self.scale}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not np.asarray(load(self.B)).any()


@dataclass(frozen=True)
class MissBat(InputTransform):
    """MiSS ``"bat"``: each r x r block W_ij becomes W_ij (I + B_i) + B_i (see the module docstring)."""

    B: TensorRef

    tuner = "MiSS"
    layers = "Linear"

    def refs(self) -> list[TensorRef]:
        return [self.B]

    def transform(self, block: Array, rows: slice, ops: BlockOps) -> None:
        def make() -> tuple[Array, Array]:
            b = np.asarray(self.B.load(), dtype=F32).reshape(self.B.shape)
            return ops.array(b + np.eye(b.shape[-1], dtype=F32)), ops.array(b)

        rotate, shift = ops.cached(self, "blocks", make)  # I + B_i, B_i
        r = self.B.shape[-1]
        groups = block.shape[1] // r
        for first in range(rows.start - rows.start % r, rows.stop, r):  # the row blocks i these rows are in
            lo, hi = max(first, rows.start), min(first + r, rows.stop)
            i = first // r
            part = block[lo - rows.start : hi - rows.start]
            out = (part.reshape(-1, r) @ rotate[i]).reshape(hi - lo, groups, r)
            out += shift[i][lo - first : hi - first].reshape(hi - lo, 1, r)  # row a of B_i, in every column block
            part[...] = out.reshape(hi - lo, groups * r)

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        blocks, r = self.B.shape[0], self.B.shape[-1]
        err = self.input_size_error(shape, math.prod(shape[1:]), (2,))  # Conv1D or not 2-D
        if err is None and shape[1] % r:
            return f"MiSS bat blocks of {r} do not divide the base tensor's {shape[1]} inputs"
        if err is None and shape[0] != blocks * r:
            return f"miss_block holds {blocks} blocks of {r} rows for the base tensor's {shape[0]} outputs"
        return err

    def describe(self) -> dict[str, Any]:
        return {"kind": "miss", "layout": "bat", "r": self.B.shape[-1], "strength": self.strength}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not np.asarray(load(self.B)).any()


def module_edit(module: str, slots: dict[str, str], layout: str, mini_r: int, tuner_input: TunerInput) -> TargetedEdit:
    """The MiSS edit of one module."""
    source = tuner_input.source
    (key,) = module_slot(module, slots, MISS_PARAMS, "MiSS", source)
    ref = TensorRef(tuner_input.checkpoint, key)
    shape = tuple(ref.shape)
    dims = 3 if layout == "bat" else 2
    if len(shape) != dims or 0 in shape or (layout == "bat" and shape[1] != shape[2]):
        wanted = "(out / r, r, r)" if layout == "bat" else "(r, mini_r)" if layout == "mini" else "(r, out)"
        raise AdapterError(
            f"{source}: {key!r} has shape {shape}, not MiSS's {wanted} for init_weights={layout!r} in "
            f"{CONFIG_NAME}; the adapter or its config is broken"
        )
    if layout == "mini" and shape[1] != mini_r:
        raise AdapterError(f"{source}: {key!r} has {shape[1]} columns but mini_r is {mini_r} in {CONFIG_NAME}")
    label = tuner_input.label
    edit: Edit = (
        MissBat(ref, adapter=label, source_key=key)
        if layout == "bat"
        else MissDelta(ref, mini=layout == "mini", adapter=label, source_key=key)
    )
    return TargetedEdit(f"{module}.weight", edit)


def read_miss(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every MiSS module's edit, and module -> r."""
    raw, source = tuner_input.config.raw, tuner_input.source
    init = raw.get("init_weights", True)
    if init not in (True, False, "bat", "mini"):
        raise AdapterError(
            f'{source}: init_weights is {_shown(init)}; PEFT\'s MiSS knows true, false, "bat" and "mini": fix '
            f"{CONFIG_NAME}"
        )
    layout = init if isinstance(init, str) else "default"
    mini_r = positive_int(raw.get("mini_r", 1), f"{source}: mini_r", f"fix it in {CONFIG_NAME}")
    edits = [module_edit(m, slots, layout, mini_r, tuner_input) for m, slots in tuner_input.modules.items()]
    sizes = {e.target.removesuffix(".weight"): e.edit.refs()[0].shape[-1 if layout == "bat" else 0] for e in edits}
    return edits, sizes


TUNER = register_tuner(
    Tuner(
        "MISS",
        MISS_PARAMS,
        read_miss,
        description="MiSS: default, mini and bat layouts (a shared block per r-column slice)",
        extra={"layers": ("linear",)},
    )
)
