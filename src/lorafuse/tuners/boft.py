"""PEFT BOFT (butterfly orthogonal fine-tuning): W' = (W @ M^T) * s, M a product of butterfly factors.

``boft_R`` is (factors, blocks, b, b): factor i is P_i B_i P_i^T, B_i the block diagonal of the exact Cayley
transforms of its blocks' skew parts (0.5 (R - R^T)) and P_i PEFT's butterfly permutation; M = F_last ... F_0.
``boft_s`` scales each output row (rows of a Linear weight, output channels of a Conv2d one, viewed as
``(out, in * k * k)``); biases are not touched. The factor, block count and size come from the saved shape: PEFT
forces one factor when its CUDA extension is missing, whatever ``boft_n_butterfly_factor`` says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arrays import F32
from ..edits import Array, BlockOps, TargetedEdit, TensorRef
from ..errors import AdapterError
from .orthogonal import InputTransform, cayley, module_slot, multiply_block_diagonal, raw_count
from .registry import Tuner, TunerInput, register_tuner

BOFT_PARAMS = ("boft_R", "boft_s")


def butterfly_order(x: Array, groups: int, half: int, inverse: bool = False) -> Array:
    """The columns of ``x`` in PEFT's block butterfly order: within each of ``groups`` groups, its runs of ``half``
    columns reordered even runs first, then odd ones (``x[:, perm]``, i.e. ``x @ P^T`` for PEFT's permutation
    matrix P; ``inverse``: ``x[:, argsort(perm)]`` = ``x @ P``). A reshape, not a gather: a new array."""
    rows = x.shape[0]
    runs = x.shape[1] // (groups * half)
    split = (rows, groups, 2, runs // 2, half) if inverse else (rows, groups, runs // 2, 2, half)
    return x.reshape(split).swapaxes(2, 3).reshape(rows, -1)


@dataclass(frozen=True)
class BoftRotation(InputTransform):
    """W' = (W @ M^T) * s (see the module docstring)."""

    R: TensorRef
    s: TensorRef

    tuner = "BOFT"

    def refs(self) -> list[TensorRef]:
        return [self.R, self.s]

    @property
    def size(self) -> int:
        """The number of inputs M acts on."""
        return self.R.shape[1] * self.R.shape[2]

    def rotations(self) -> np.ndarray:
        """The (factors, blocks, b, b) exact Cayley transforms of the blocks' skew parts, in fp32 as PEFT."""
        count, blocks, width = self.R.shape[:3]
        data = np.asarray(self.R.load(), dtype=F32).reshape(count * blocks, width, width)
        return cayley(np.float32(0.5) * (data - data.swapaxes(1, 2))).reshape(count, blocks, width, width)

    def transform(self, block: Array, rows: slice, ops: BlockOps) -> None:
        """block @ F_0^T @ F_1^T ... (F_i^T = P_i B_i^T P_i^T), then each row times its s."""

        def make() -> tuple[list[Array], Array]:
            blocks = [ops.array(np.ascontiguousarray(f.swapaxes(1, 2))) for f in self.rotations()]
            return blocks, ops.array(np.asarray(self.s.load(), dtype=F32).reshape(-1, 1))

        factors, scale = ops.cached(self, "factors", make)
        for i, blocks in enumerate(factors):
            if i == 0:  # PEFT's first permutation is the identity
                multiply_block_diagonal(block, blocks)
                continue
            groups, half = self.R.shape[1] // 2**i, self.R.shape[2] // 2
            shuffled = butterfly_order(block, groups, half, inverse=True)
            multiply_block_diagonal(shuffled, blocks)
            block[...] = butterfly_order(shuffled, groups, half)
        block *= scale[rows]

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        err = self.input_size_error(shape, self.size)
        if err is None and math.prod(self.s.shape) != shape[0]:
            return f"boft_s has {math.prod(self.s.shape)} scales for {shape[0]} output features"
        return err

    def describe(self) -> dict[str, Any]:
        count, blocks, width = self.R.shape[:3]
        return {
            "kind": "boft",
            "factors": count,
            "blocks": blocks,
            "block_size": width,
            "strength": self.strength,
        }

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        data = np.asarray(load(self.R))
        scale = np.asarray(load(self.s))
        return not (data - data.swapaxes(-1, -2)).any() and bool((scale == 1).all())


def check_config(raw: dict[str, Any], source: str) -> None:
    """BOFT's config keys, type-checked (the merge reads its sizes from the saved shapes)."""
    size, num = raw_count(raw, "boft_block_size", 4, source), raw_count(raw, "boft_block_num", 0, source)
    if (size == 0) == (num == 0):
        raise AdapterError(
            f"{source}: BOFT needs exactly one of boft_block_size ({size}) and boft_block_num ({num}) non-zero"
        )
    raw_count(raw, "boft_n_butterfly_factor", 1, source)


def module_edit(module: str, slots: dict[str, str], tuner_input: TunerInput) -> TargetedEdit:
    """The BOFT edit of one module."""
    source = tuner_input.source
    r_key, s_key = module_slot(module, slots, BOFT_PARAMS, "BOFT", source)
    r_ref, s_ref = TensorRef(tuner_input.checkpoint, r_key), TensorRef(tuner_input.checkpoint, s_key)
    shape = tuple(r_ref.shape)
    if len(shape) != 4 or shape[2] != shape[3] or 0 in shape:
        raise AdapterError(
            f"{source}: {r_key!r} has shape {shape}, not BOFT blocks (factors, blocks, b, b); the adapter file is "
            "broken"
        )
    count, blocks, width = shape[:3]
    if count > 1 and (width % 2 or blocks % 2 ** (count - 1)):
        raise AdapterError(
            f"{source}: {r_key!r} has {count} butterfly factors of {blocks} blocks of {width}: PEFT needs an even "
            f"block size and a block count divisible by {2 ** (count - 1)}; the adapter file is broken"
        )
    edit = BoftRotation(r_ref, s_ref, adapter=tuner_input.label, source_key=r_key)
    return TargetedEdit(f"{module}.weight", edit)


def read_boft(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every BOFT module's edit, and module -> its number of blocks per factor."""
    check_config(tuner_input.config.raw, tuner_input.source)
    edits = [module_edit(m, slots, tuner_input) for m, slots in tuner_input.modules.items()]
    return edits, {e.target.removesuffix(".weight"): e.edit.R.shape[1] for e in edits}  # type: ignore[attr-defined]


TUNER = register_tuner(
    Tuner(
        "BOFT",
        BOFT_PARAMS,
        read_boft,
        description="BOFT (W' = (W M^T) s, M a product of butterfly factors; biases untouched)",
        extra={"layers": ("linear", "conv2d")},
    )
)
