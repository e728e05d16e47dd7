"""The LyCORIS updates, as edits that build only a row block's share of the update: LoHa's Hadamard product of two
low-rank matrices and LoKr's Kronecker product of two small matrices, each factor stored whole, as a low-rank pair
or as a Tucker product (LyCORIS' "CP" / effective-conv form of a conv kernel).

The math is PEFT's ``get_delta_weight`` (peft/tuners/loha/layer.py, lokr/layer.py), and the names here are not
PEFT's: a reader (tuners/loha.py, tuners/lokr.py, later LyCORIS files) maps its tensors onto :class:`Factor` s.
Factors are small (a rank times a side of the weight); they are computed once per tensor in fp32 with numpy and
handed to the kernel's array library (:class:`~lorafuse.edits.BlockOps`), so the same code runs on the CUDA
kernel. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..arrays import F32, frobenius_norm
from ..edits import Array, BlockOps, Edit, TensorRef
from ..errors import AdapterError

Load = Callable[[TensorRef], np.ndarray]
# inspect's ||update||_F of a Hadamard product goes through (r1*r2)^2 Gram matrices: beyond this many rank pairs
# that costs more than it tells, and the norm is left out.
MAX_GRAM_PAIRS = 1024


def _shape(ref: TensorRef) -> tuple[int, ...]:
    return tuple(ref.shape)


@dataclass(frozen=True)
class Factor:
    """A matrix an adapter stores in parts: ``whole``; or ``up @ down`` (up (rows, r), down (r, cols...)); or, with
    ``core`` (r1, r2, *kernel), the Tucker product ``M[p, q, *k] = sum_ij core[i, j, *k] up[i, p] down[j, q]``
    (up (r1, rows), down (r2, cols)), a conv kernel of shape (rows, cols, *kernel).

    Viewed as 2-D, (rows, everything else), the matrix is ``left @ right`` (:meth:`halves`), so one row block of
    it is ``left[rows] @ right``.
    """

    whole: TensorRef | None = None
    up: TensorRef | None = None
    down: TensorRef | None = None
    core: TensorRef | None = None

    def refs(self) -> list[TensorRef]:
        return [r for r in (self.whole, self.up, self.down, self.core) if r is not None]

    @property
    def rank(self) -> int | None:
        """The rank of a pair or Tucker product; None for a matrix stored whole."""
        if self.whole is not None or self.up is None:
            return None
        return _shape(self.up)[0] if self.core is not None else _shape(self.up)[-1]

    def error(self) -> str | None:
        """Why the parts make no matrix (missing, too few dimensions, ranks that disagree), or None."""
        if self.whole is not None:
            return None if len(self.whole.shape) >= 2 else f"{self.whole.name} {_shape(self.whole)} is not a matrix"
        if self.up is None or self.down is None:
            return "a factor has neither its whole matrix nor both of its low-rank parts"
        up, down = _shape(self.up), _shape(self.down)
        if self.core is None:
            if len(up) != 2 or len(down) < 2 or up[1] != down[0] or up[1] == 0:
                return f"{self.up.name} {up} and {self.down.name} {down} are no low-rank pair (rank mismatch)"
            return None
        core = _shape(self.core)
        if len(up) != 2 or len(down) != 2 or len(core) < 3 or core[:2] != (up[0], down[0]) or 0 in core[:2]:
            return (
                f"Tucker core {self.core.name} {core} does not fit its factors {self.up.name} {up} and "
                f"{self.down.name} {down}"
            )
        return None

    @property
    def shape(self) -> tuple[int, ...]:
        """The matrix's shape: (rows, cols) for a pair, (rows, cols, *kernel) for a Tucker product."""
        if self.whole is not None:
            return _shape(self.whole)
        assert self.up is not None and self.down is not None
        if self.core is not None:
            return (_shape(self.up)[1], _shape(self.down)[1], *_shape(self.core)[2:])
        return (_shape(self.up)[0], *_shape(self.down)[1:])

    def halves(self, load: Load) -> tuple[np.ndarray, np.ndarray]:
        """(left (rows, r), right (r, cols)) in fp32 with the matrix, viewed as 2-D, = left @ right (a pair or a
        Tucker product; a matrix stored whole has no halves)."""
        assert self.up is not None and self.down is not None and self.whole is None
        up, down = load(self.up), load(self.down)
        if self.core is None:
            return up, down.reshape(down.shape[0], -1)
        core = load(self.core)
        # core[i, j, *k] down[j, q] summed over j -> (i, q, *k): the rows' Tucker factor up[i, p] is all that is left
        inner = np.moveaxis(np.tensordot(core, down, axes=([1], [0])), -1, 1)
        return np.ascontiguousarray(up.T), np.ascontiguousarray(inner.reshape(inner.shape[0], -1))

    def matrix(self, load: Load) -> np.ndarray:
        """The whole matrix in fp32, in its shape (small factors only: LoKr's)."""
        if self.whole is not None:
            return load(self.whole).reshape(self.shape)
        left, right = self.halves(load)
        return np.matmul(left, right).reshape(self.shape)

    def is_zero(self, load: Load) -> bool:
        """True when a stored part is all zeros, so the matrix is (PEFT leaves one part at zero when it starts)."""
        return any(not load(ref).any() for ref in self.refs())


def _loaded(ref: TensorRef) -> np.ndarray:
    """The tensor in fp32 numpy (the runtime's in-memory refs load torch tensors on the CPU)."""
    return np.asarray(ref.load(), dtype=F32)


def _fits(update: tuple[int, ...], shape: tuple[int, ...], what: str) -> str | None:
    """Why an update of shape ``update`` cannot be reshaped onto a base tensor of ``shape`` row for row, or None.

    PEFT reshapes the update to the base weight's shape, so rows must agree and the rest hold as many values;
    where the update names its input channels (a conv kernel), they must agree too.
    """
    if not shape or update[0] != shape[0] or math.prod(update[1:]) != math.prod(shape[1:]):
        return f"the {what} update has shape {update} but the base tensor is {tuple(shape)}"
    if len(update) > 2 and len(shape) > 2 and update[1] != shape[1]:
        return f"the {what} update has shape {update} but the base tensor is {tuple(shape)} (input channels)"
    return None


@dataclass(frozen=True)
class HadamardDelta(Edit):
    """LoHa: W += scale * (M1 * M2), the elementwise product of two low-rank (or Tucker) matrices of W's shape:
    M1 = up1 @ down1 or, with ``core1``, their Tucker product (see :class:`Factor`); M2 likewise.

    A row block needs only the rows' share of each: ``(left1[rows] @ right1) * (left2[rows] @ right2)``.
    ``rank`` is what reports show (the rank both factors share). The tensors are fields of the edit itself (not
    of nested objects), as the runtime expects when it loads an edit's tensors into memory.
    """

    up1: TensorRef
    down1: TensorRef
    up2: TensorRef
    down2: TensorRef
    scale: float
    rank: int
    core1: TensorRef | None = None
    core2: TensorRef | None = None

    @property
    def first(self) -> Factor:
        return Factor(up=self.up1, down=self.down1, core=self.core1)

    @property
    def second(self) -> Factor:
        return Factor(up=self.up2, down=self.down2, core=self.core2)

    def refs(self) -> list[TensorRef]:
        return self.first.refs() + self.second.refs()

    def delta_shape(self) -> tuple[int, ...]:
        return self.first.shape

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        for factor in (self.first, self.second):
            err = factor.error()
            if err:
                return err
        if self.first.shape != self.second.shape:
            return f"the two Hadamard factors have shapes {self.first.shape} and {self.second.shape}"
        return _fits(self.first.shape, shape, "LoHa")

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        return _no_conv1d(self, conv1d, "LoHa")

    def _halves(self, ops: BlockOps) -> tuple[Array, Array, Array, Array]:
        def make() -> tuple[Array, Array, Array, Array]:
            left1, right1 = self.first.halves(_loaded)
            left2, right2 = self.second.halves(_loaded)
            left1 = left1 * np.float32(self.scale)  # the scale once per tensor, on a factor
            return tuple(ops.array(np.ascontiguousarray(a, dtype=F32)) for a in (left1, right1, left2, right2))

        return ops.cached(self, "halves", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        left1, right1, left2, right2 = self._halves(ops)
        second = left2[rows] @ right2
        second *= ops.product(left1[rows], right1)
        block += second

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        described = {"kind": "loha", "rank": self.rank, "scale": self.scale, "shape": list(self.delta_shape())}
        return described | ({"tucker": True} if self.first.core is not None else {})

    def no_effect(self, load: Load = TensorRef.load) -> bool:
        return self.first.is_zero(load) or self.second.is_zero(load)

    def delta_norm(self, load: Load = TensorRef.load) -> float | None:
        """``||scale * M1 * M2||_F`` from Gram matrices of the row-wise Kronecker products of the halves (the
        Hadamard product of two products is one product of rank r1 * r2); None when that rank is large."""
        if self.no_effect(load):
            return 0.0
        left1, right1 = (np.asarray(a, dtype=np.float64) for a in self.first.halves(load))
        left2, right2 = (np.asarray(a, dtype=np.float64) for a in self.second.halves(load))
        pairs = left1.shape[1] * left2.shape[1]
        if pairs > MAX_GRAM_PAIRS:
            return None
        left = (left1[:, :, None] * left2[:, None, :]).reshape(left1.shape[0], pairs)
        right = (right1[:, None, :] * right2[None, :, :]).reshape(pairs, right1.shape[1])
        squared = float(((left.T @ left) * (right @ right.T)).sum())
        return math.sqrt(max(squared, 0.0)) * abs(self.scale)


@dataclass(frozen=True)
class KroneckerDelta(Edit):
    """LoKr: W += scale * kron(M1, M2), reshaped to W's shape, with M1 (a, c) and M2 (b, d, *kernel) small.

    As torch.kron lines them up (PEFT's ``make_kron``): with M2 2-D or 4-D (M1 then gains two unit dims) the
    update is (a*b, c*d, *kernel), so row ``i*b + j`` is ``M1[i] (x) M2[j]``. With M2 3-D (a Conv1d kernel
    stored whole) torch.kron pads M1 on the left to (1, a, c): the update is (b, a*d, c*k) and, reshaped, row
    ``j*a + t`` holds ``M2[j, l, p] * M1[t, k]`` at column ``(l*c + k)*k_size + p``. Either way a row block
    needs only the rows of M1 and M2 it covers.

    M1 is ``whole1`` or ``up1 @ down1``; M2 is ``whole2``, ``up2 @ down2`` or their Tucker product with ``core2``
    (see :class:`Factor`). ``rank`` is what reports show (the config's: factors stored whole have none).
    """

    scale: float
    rank: int
    whole1: TensorRef | None = None
    up1: TensorRef | None = None
    down1: TensorRef | None = None
    whole2: TensorRef | None = None
    up2: TensorRef | None = None
    down2: TensorRef | None = None
    core2: TensorRef | None = None

    @property
    def first(self) -> Factor:
        return Factor(whole=self.whole1, up=self.up1, down=self.down1)

    @property
    def second(self) -> Factor:
        return Factor(whole=self.whole2, up=self.up2, down=self.down2, core=self.core2)

    def refs(self) -> list[TensorRef]:
        return self.first.refs() + self.second.refs()

    @property
    def _padded(self) -> bool:
        """torch.kron pads M1 to M2's three dimensions instead of giving it unit kernel dims."""
        return len(self.second.shape) == 3

    def delta_shape(self) -> tuple[int, ...]:
        """The update's shape as PEFT reshapes it: (a*b, c*d, *kernel)."""
        (a, c), (b, d, *kernel) = self.first.shape, self.second.shape
        return (a * b, c * d, *kernel)

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        for factor in (self.first, self.second):
            err = factor.error()
            if err:
                return err
        if len(self.first.shape) != 2:
            return f"the first Kronecker factor has shape {self.first.shape}, not a matrix"
        return _fits(self.delta_shape(), shape, "LoKr")

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        return _no_conv1d(self, conv1d, "LoKr")

    def _matrices(self, ops: BlockOps) -> tuple[Array, Array]:
        def make() -> tuple[Array, Array]:
            first = self.first.matrix(_loaded) * np.float32(self.scale)  # the scale once, on the small factor
            second = self.second.matrix(_loaded)
            if not self._padded:
                second = second.reshape(second.shape[0], -1)
            return ops.array(np.ascontiguousarray(first, dtype=F32)), ops.array(np.ascontiguousarray(second))

        return ops.cached(self, "matrices", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        first, second = self._matrices(ops)
        outer = first.shape[0] if self._padded else second.shape[0]  # rows per step of the slower index
        low, high = rows.start // outer, -(-rows.stop // outer)
        if self._padded:  # rows j*a + t: M2[j, l, p] * M1[t, k] at (l, k, p)
            part = second[low:high, None, :, None, :] * first[None, :, None, :, None]
        else:  # rows i*b + j: M1[i, k] * M2[j, q] at (k, q)
            part = first[low:high, None, :, None] * second[None, :, None, :]
        part = part.reshape((high - low) * outer, -1)
        skip = rows.start - low * outer
        block += part[skip : skip + block.shape[0]]

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "lokr",
            "rank": self.rank,
            "scale": self.scale,
            "shape": list(self.delta_shape()),
            "factors": [list(self.first.shape), list(self.second.shape)],
        }

    def no_effect(self, load: Load = TensorRef.load) -> bool:
        return self.first.is_zero(load) or self.second.is_zero(load)

    def delta_norm(self, load: Load = TensorRef.load) -> float | None:
        """``||kron(M1, M2)||_F = ||M1||_F ||M2||_F``, times the scale."""
        if self.no_effect(load):
            return 0.0
        first, second = self.first.matrix(load), self.second.matrix(load)
        return frobenius_norm(first) * frobenius_norm(second) * abs(self.scale)


def _no_conv1d(edit: Edit, conv1d: bool | None, kind: str) -> Edit:
    """PEFT wraps only Linear and Conv layers with LoHa/LoKr: an update aimed at a GPT-2 Conv1D weight (stored
    transposed) was not trained on this base, and applying it either way would be a guess."""
    if conv1d:
        raise AdapterError(
            f"{edit.adapter}: {edit.source_key!r} is a {kind} update for a GPT-2 Conv1D layer, which PEFT's {kind} "
            "cannot wrap: is this the base model the adapter was trained on?"
        )
    return edit
