"""What OFT, BOFT and HRA share: edits that multiply a weight by a matrix on its input side, W' = W @ M.

PEFT's orthogonal tuners rotate (or reflect) a layer's inputs: the merged weight is the base weight times a matrix
acting on its input features (columns of the weight viewed as ``(out, -1)``: a Conv2d weight's ``in * k * k``
values per output channel, an embedding's ``dim`` columns). Each row of W changes on its own, so these edits
stream by row blocks like LoRA: the small factors of M (rotation blocks, reflection vectors) are built once per
tensor in fp32, as PEFT builds them, and kept for its blocks; M itself (in x in) is never formed, as it is block
diagonal or low rank. No torch here: the same code runs on torch tensors through engine/cuda.py's ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..arrays import F32
from ..edits import Array, BlockOps, Edit
from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME, _flag, _shown, finite_number


@dataclass(frozen=True)
class InputTransform(Edit):
    """W' = W + strength * (T(W) - W), where T(W) is the tuner's merged weight (W @ M, maybe rows rescaled).

    PEFT has no strength for these tuners (it warns and keeps 1). A strength here interpolates between the base
    and PEFT's merged weight: 1 is PEFT's merge, 0 the base, 0.5 half way. ``on_conv1d`` marks a target that is a
    GPT-2 Conv1D weight, which PEFT never wraps with these tuners: :meth:`shape_error` refuses it.
    """

    strength: float = field(default=1.0, kw_only=True)
    on_conv1d: bool = field(default=False, kw_only=True)

    tuner = "OFT"  # for messages; each subclass names its tuner
    layers = "Linear and Conv2d"

    def transform(self, block: Array, rows: slice, ops: BlockOps) -> None:
        """Set ``block`` (the rows ``rows``) to T(block), as PEFT's merge leaves those rows."""
        raise NotImplementedError

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        if self.strength == 1.0:
            self.transform(block, rows, ops)
            return
        kept = block * np.float32(1.0 - self.strength)  # (1 - s) W + s T(W)
        self.transform(block, rows, ops)
        block *= np.float32(self.strength)
        block += kept

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        return replace(self, on_conv1d=True) if conv1d else self

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, strength=self._times(self.strength, strength))

    def input_size_error(self, shape: tuple[int, ...], size: int, dims: tuple[int, ...] = (2, 4)) -> str | None:
        """Why a target of ``shape`` is not a layer whose rows hold ``size`` input values, or None."""
        if self.on_conv1d:
            return f"PEFT's {self.tuner} does not wrap GPT-2 Conv1D layers (only {self.layers} layers)"
        if len(shape) not in dims:
            return f"{self.tuner} changes {self.layers} weights, not a tensor of shape {tuple(shape)}"
        inputs = math.prod(shape[1:])
        if inputs != size:
            return f"the {self.tuner} matrix acts on {size} inputs but each row of the base tensor has {inputs}"
        return None


def multiply_block_diagonal(x: Array, blocks: Array) -> None:
    """``x = x @ block_diag(*blocks)`` in place, for ``x`` (rows, n) and ``blocks`` (k, h, h), without the n x n
    matrix. ``k == 1`` repeats the one block along the diagonal (OFT's ``block_share``); else ``k * h == n``."""
    rows, h = x.shape[0], blocks.shape[-1]
    count = x.shape[1] // h
    if blocks.shape[0] == 1:  # one product for every block
        x[...] = (x.reshape(rows * count, h) @ blocks[0]).reshape(rows, count * h)
        return
    # One product per block, on a view of its columns. Measured on a 4 MB block (512 x 2048, blocks of 32): 5 ms,
    # where numpy's batched matmul over the blocks takes 11 ms.
    for start in range(0, count * h, h):
        part = x[:, start : start + h]
        part[...] = part @ blocks[start // h]


def cayley(skew: np.ndarray) -> np.ndarray:
    """The exact Cayley transform of a batch of skew-symmetric matrices Q: (I - Q) (I + Q)^-1, in fp32.

    PEFT solves X (I + Q) = I - Q in the adapter's dtype (fp32); the same solve here, transposed for numpy:
    (I + Q)^T X^T = (I - Q)^T.
    """
    eye = np.eye(skew.shape[-1], dtype=F32)
    left = (eye + skew).swapaxes(-1, -2)
    right = (eye - skew).swapaxes(-1, -2)
    return np.ascontiguousarray(np.linalg.solve(left, right).swapaxes(-1, -2), dtype=F32)


def raw_flag(raw: dict[str, Any], key: str, default: bool, source: str) -> bool:
    """A boolean config key, or PEFT's default when the key is absent."""
    return default if raw.get(key) is None else _flag(raw, key, source)


def raw_count(raw: dict[str, Any], key: str, default: int, source: str) -> int:
    """A whole number >= 0 from the config (PEFT's block sizes and counts, 0 meaning "derive it")."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AdapterError(
            f"{source}: {key} is {_shown(value)}, not a whole number of at least 0: fix it in {CONFIG_NAME}"
        )
    return value


def raw_number(raw: dict[str, Any], key: str, default: float, source: str) -> float:
    """A finite number from the config."""
    value = raw.get(key, default)
    return finite_number(value, f"{source}: {key}", f"fix it in {CONFIG_NAME}", AdapterError)


def module_slot(module: str, slots: dict[str, str], wanted: tuple[str, ...], tuner: str, source: str) -> list[str]:
    """The keys of ``wanted`` slots of one module; a missing one, or a slot this tuner does not save, is refused."""
    extra = sorted(set(slots) - set(wanted))
    if extra:
        raise AdapterError(
            f"{source}: module {module!r} holds {slots[extra[0]]!r}, which is not a {tuner} tensor lorafuse understands"
        )
    missing = [slot for slot in wanted if slot not in slots]
    if missing:
        raise AdapterError(f"{source}: module {module!r} has no {missing[0]} tensor; the adapter file is incomplete")
    return [slots[slot] for slot in wanted]
