"""Edit kinds: each changes one base tensor, or a range of its rows, in fp32, one block of rows at a time.

An adapter format reads its file into :class:`TargetedEdit` s (the tensor the adapter names, an optional row
range of it, the edit); the plan maps targets onto base tensors and a kernel applies each tensor's edits in
order to blocks of its rows (engine/kernel.py: numpy on the CPU; engine/cuda.py: torch on a GPU, through the same
``apply``). An edit knows its own math (:meth:`Edit.apply`), how a strength scales it (:meth:`Edit.scaled`),
what it is (:meth:`Edit.describe`), how large its change is (:meth:`Edit.delta_norm`), whether it changes nothing
(:meth:`Edit.no_effect`) and which adapter tensors it reads (:meth:`Edit.refs`): a new tuner type is a new class
here, nothing else.

A block is the fp32 rows ``rows`` (a slice, in the edit's own row numbering) of the tensor viewed as 2-D:
``(rows, prod(shape[1:]))``, a 1-D tensor as one column. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from .arrays import F32, decode_f32, frobenius_norm
from .conv1d import ORIENTATION_FIX
from .errors import AdapterError, NonFiniteError
from .io.checkpoint import Checkpoint
from .peft_flags import finite_number

Layout = Literal["linear", "transposed", "conv"]
Array = Any  # a numpy array on the CPU kernel, a torch tensor on the CUDA kernel and in lorafuse.runtime


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside an adapter checkpoint, loaded only when needed."""

    checkpoint: Checkpoint
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.checkpoint.infos[self.name].shape

    @property
    def file(self) -> str:
        return str(self.checkpoint.infos[self.name].path)

    def load(self) -> np.ndarray:
        """The whole tensor as fp32, in memory owned by the caller."""
        return decode_f32(self.checkpoint.array(self.name), self.checkpoint.infos[self.name].dtype)

    def load_span(self, start: int, stop: int) -> np.ndarray:
        """Elements ``start:stop`` of the tensor flattened, as fp32 (read alone: a block's share of a big tensor)."""
        info = self.checkpoint.infos[self.name]
        return decode_f32(self.checkpoint.elements(self.name, start, stop), info.dtype)


def fp32_of(ref: TensorRef) -> np.ndarray:
    """A tensor's values as fp32 numpy, whatever ``ref`` is (the runtime's in-memory refs load torch tensors)."""
    return np.asarray(ref.load(), dtype=F32)


def require_finite(ref: TensorRef, values: np.ndarray) -> np.ndarray:
    """``values`` (``ref`` as loaded) when they hold no NaN/Inf; else :class:`NonFiniteError` naming file and tensor."""
    if values.size and not np.isfinite(values.min() + values.max()):  # NaN propagates; Inf shows (or overflows)
        raise NonFiniteError(f"{ref.file}: tensor {ref.name!r} holds NaN or Inf; the adapter is broken")
    return values


def lora_rank_error(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> str | None:
    """Why ``lora_A``/``lora_B`` of these shapes are no LoRA pair (too few dimensions, ranks that differ, rank 0),
    or None. The one check every reader and the plan use."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        return f"lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)} are not LoRA factors (2 or more dimensions)"
    if a_shape[0] != b_shape[1]:
        return f"lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)} disagree on the rank"
    if a_shape[0] == 0:
        return f"lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)} have rank 0"
    return None


class BlockOps:
    """What an edit reads and computes with, on numpy: adapter tensors in fp32 and a few array operations.

    One per output tensor and thread. Values every block needs (LoRA factors, magnitudes) are read once and kept
    for the tensor's blocks (:meth:`cached`); a block's share of a big tensor (a replacement, a difference) is read
    per block (:meth:`span`). Products go into one reused buffer: a fresh 4 MB array per block would cost page
    faults every time. engine/cuda.py gives the same operations on torch, so every edit has one implementation.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[int, str], Any] = {}
        self._product = np.empty(0, dtype=F32)

    def forget(self) -> None:
        """Drop the values kept for the last tensor (its factors), before the next one."""
        self._kept.clear()

    def cached(self, owner: object, what: str, make: Callable[[], Array]) -> Array:
        """``make()``, computed once per ``owner`` (an edit) and ``what`` for the life of this object."""
        key = (id(owner), what)
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def array(self, values: np.ndarray) -> Array:
        """fp32 numpy values (read from a file) as this library's array."""
        return values

    def load(self, ref: TensorRef) -> Array:
        """The whole adapter tensor in fp32."""
        return self.array(ref.load())

    def span(self, ref: TensorRef, rows: slice, cols: int) -> Array:
        """Rows ``rows`` of the adapter tensor viewed as ``(-1, cols)``, in fp32, in memory the caller may change."""
        return self.array(ref.load_span(rows.start * cols, rows.stop * cols).reshape(-1, cols))

    def product(self, left: Array, right: Array) -> Array:
        """``left @ right`` in fp32, into a buffer reused by the next call."""
        size = left.shape[0] * right.shape[1]
        if self._product.size < size:
            self._product = np.empty(size, dtype=F32)
        out = self._product[:size].reshape(left.shape[0], right.shape[1])
        return np.matmul(left, right, out=out)

    def norm(self, values: Array, axis: int) -> Array:
        """The L2 norm along ``axis``, keeping the dimension."""
        return np.linalg.norm(values, axis=axis, keepdims=True)

    def contiguous(self, values: Array) -> Array:
        return np.ascontiguousarray(values)

    def svd(self, values: Array) -> tuple[Array, Array, Array]:
        """The thin SVD ``(U, S, Vh)`` of a 2-D fp32 array (KaSA's truncation of a base weight)."""
        return np.linalg.svd(values, full_matrices=False)


@dataclass(frozen=True)
class Edit:
    """One change to a tensor. ``adapter`` labels where it came from (for errors and reports), ``source_key`` the
    adapter tensor that names it."""

    adapter: str = field(default="", kw_only=True)
    source_key: str = field(default="", kw_only=True)

    # --- what the kernel needs to know -------------------------------------------------------------------------
    @property
    def whole_tensor(self) -> bool:
        """The edit needs all rows at once (a norm across rows): the kernel gives it the tensor as one block."""
        return False

    @property
    def needs_base(self) -> bool:
        """The edit reads the rows as they were before the tensor's other edits (DoRA's norm)."""
        return False

    @property
    def overwrites(self) -> bool:
        """The edit sets every value of its rows whatever they held: nothing before it needs to be read."""
        return False

    @property
    def goes_first(self) -> bool:
        """The edit gives the values every other edit of the tensor applies on (a saved copy of the base layer)."""
        return False

    @property
    def changes_base(self) -> bool:
        """The edit also rewrites the base weight it applies on, as PEFT does when it loads the adapter (KaSA's SVD
        truncation): beside another adapter's edit of the same tensor, which weight each saw in training is not
        settled by an order, so the plan refuses the pair."""
        return False

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        """Change ``block`` in place: the fp32 rows ``rows`` of the target (2-D, see the module docstring).

        ``base`` holds the same rows before the tensor's other edits (only for :attr:`needs_base`; None when
        ``block`` still holds them).
        """
        raise NotImplementedError

    # --- what the plan, inspect and reports need ---------------------------------------------------------------
    def refs(self) -> list[TensorRef]:
        """The adapter tensors the edit reads."""
        return []

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        """Why this edit cannot apply to a target of ``shape``, or None when it fits."""
        return None

    def new_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape a target of ``shape`` has after this edit when the edit changes it (a resized vocabulary
        saved whole), else None."""
        return None

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        """The edit as it applies to a target of ``shape``; the plan calls it for every edit before its shape check.

        ``conv1d`` is what the base says of the target's layer class (conv1d.py): True for a weight stored (in,
        out), a GPT-2 ``Conv1D`` one (or MoE experts stored (experts, in, out), gpt-oss); False for any other
        layer (``nn.Linear`` (out, in), embeddings, convs); None when nothing tells (no config.json, custom
        code). An edit whose math depends on the orientation of a 2-D weight follows ``conv1d`` when it is known,
        whatever its adapter's ``fan_in_fan_out`` says (PEFT decides per layer); when it is None, only a shape that
        fits one orientation alone decides, and a weight that fits both (square) is refused with an
        :class:`AdapterError` ending in ``conv1d.ORIENTATION_FIX``: never guess. Edits that do not depend on it
        (biases, replacements) return themselves.
        """
        return self

    def bound(self, base: Checkpoint, key: str) -> Edit:
        """The edit as it applies to base tensor ``key`` of ``base``; the plan calls it after :meth:`oriented` (an
        edit computed from its layer's other tensors, the weight of a bias, reads them there: tuners/peft_layer.py)."""
        return self

    @property
    def reads(self) -> tuple[str, ...]:
        """Base tensors besides its target that the edit reads, as stored (set by :meth:`bound`); the plan refuses
        an earlier adapter changing one of them, which the edit would not see."""
        return ()

    def scaled(self, strength: float) -> Edit:
        """A copy whose effect is scaled by ``strength`` (the per-adapter ``--weight``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A short description for inspect and reports: ``kind`` and what sets the size of the change."""
        return {"kind": type(self).__name__}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        """True when the edit changes nothing whatever the base (an untrained lora_B of zeros); ``load`` reads
        a tensor (the plan passes one that checks values too)."""
        return False

    def delta_norm(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> float | None:
        """``||change||_F`` in fp64 when it does not depend on the base (inspect's size of an update), else None;
        ``load`` reads a tensor."""
        return None

    def _times(self, value: float, strength: float) -> float:
        """``value * strength``, which must stay finite (a huge alpha times a huge strength overflows)."""
        what = f"{self.adapter}: the scale of {self.source_key!r} times the adapter's strength {strength:g}"
        return finite_number(value * strength, what, "use a smaller strength or lora_alpha", AdapterError)


def transposed_for(
    edit: Edit, shape: tuple[int, ...], conv1d: bool | None, fits: Callable[[bool], bool], unknown: bool
) -> bool:
    """Whether ``edit`` applies to a 2-D weight of ``shape`` as a GPT-2 Conv1D (in, out) one, as
    :meth:`Edit.oriented` decides it: by ``conv1d`` when the base says; else by the one orientation ``fits``
    (transposed -> the update fits) accepts, ``unknown`` when neither does (the plan's shape error then names it),
    and refused when both do (a square weight)."""
    if conv1d is not None:
        return conv1d
    fitting = [t for t in (False, True) if fits(t)]
    if len(fitting) == 2:
        raise AdapterError(
            f"{edit.adapter}: {edit.source_key!r} updates a square {shape[0]}x{shape[1]} weight that may be a "
            "Linear (out, in) or a GPT-2 Conv1D (in, out) layer, and the base model does not say which: "
            f"{ORIENTATION_FIX}"
        )
    return fitting[0] if fitting else unknown


class FactoredUpdate(Edit):
    """An edit whose update is ``left @ right`` with left (out, r) and right (r, in): W[rows] += left[rows] @ right,
    the transpose for a ``transposed`` (GPT-2 Conv1D, (in, out)) target. Subclasses are frozen dataclasses with a
    ``transposed`` field and :meth:`_factors`; the factors are built once per tensor."""

    transposed: bool  # declared by each subclass's dataclass fields

    def _factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) of the (out, in) update, in fp32 numpy, every scale applied."""
        raise NotImplementedError

    def _halves(self, ops: BlockOps) -> tuple[Array, Array]:
        def make() -> tuple[Array, Array]:
            left, right = self._factors()
            if self.transposed:  # W (in, out) += right.T @ left.T
                left, right = right.T, left.T
            return ops.array(np.ascontiguousarray(left)), ops.array(np.ascontiguousarray(right))

        return ops.cached(self, "halves", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        left, right = self._halves(ops)
        block += ops.product(left[rows], right)


@dataclass(frozen=True)
class LoraDelta(Edit):
    """W += scale * B @ A, in the layout of the base tensor.

    ``linear``: W is (out, in). ``transposed``: W is (in, out) (fan_in_fan_out Conv1D, and embeddings where PEFT
    stores A as (r, num_embeddings) and B as (dim, r)). ``conv``: W is (out, in, *kernel), B is (out, r, 1, ...),
    A is (r, in, *kernel). Every layout splits by rows of W: rows of B (linear, conv) or of A.T (transposed).
    """

    A: TensorRef
    B: TensorRef
    scale: float
    layout: Layout = "linear"
    # PEFT orients a 2-D LoRA by its layer's class (Linear or Conv1D): ``layout`` is then only the adapter's
    # fan_in_fan_out and the base must establish the orientation (see oriented). Other formats fix the layout.
    by_layer: bool = False

    def refs(self) -> list[TensorRef]:
        return [self.A, self.B]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_shape(self) -> tuple[int, ...]:
        out = self.B.shape[0]
        if self.layout == "conv":
            return (out, *self.A.shape[1:])
        if self.layout == "transposed":
            return (self.A.shape[1], out)
        return (out, self.A.shape[1])

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        rank_error = lora_rank_error(self.A.shape, self.B.shape)
        if rank_error:
            return rank_error
        if tuple(shape) != self.delta_shape():
            return f"the adapter's update has shape {self.delta_shape()} but the base tensor is {tuple(shape)}"
        return None

    def factors(self, ops: BlockOps) -> tuple[Array, Array]:
        """(left, right) with W[rows] += left[rows] @ right: the scale goes on B, once per tensor."""

        def make() -> tuple[Array, Array]:
            a = ops.load(self.A).reshape(self.A.shape[0], -1)
            b = ops.load(self.B).reshape(self.B.shape[0], -1)
            b *= np.float32(self.scale)
            if self.layout == "transposed":  # W (in, out) += A.T @ (s * B).T
                return ops.contiguous(a.T), ops.contiguous(b.T)
            return b, a

        return ops.cached(self, "factors", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        left, right = self.factors(ops)
        block += ops.product(left[rows], right)

    def _flipped(self) -> LoraDelta:
        """The same LoRA read in the other orientation (Linear <-> GPT-2 Conv1D)."""
        return replace(self, layout="transposed" if self.layout == "linear" else "linear")

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        """Orient a LoRA as PEFT does: by the layer's class, whatever the adapter config's ``fan_in_fan_out`` says.

        A known ``conv1d`` decides (an update that does not fit that orientation is then the plan's shape error,
        never flipped to fit). Unknown, a shape that fits one orientation alone decides; a square one that fits
        both is refused for a PEFT LoRA (``by_layer``), whose one fan_in_fan_out flag cannot tell its layers apart.
        """
        if self.layout not in ("linear", "transposed") or "lora_embedding" in self.source_key:
            return self  # conv layers have one layout; embeddings are always transposed
        if conv1d is not None:
            return self if self.layout == ("transposed" if conv1d else "linear") else self._flipped()
        fitting = [edit for edit in (self, self._flipped()) if edit.shape_error(shape) is None]
        if len(fitting) == 2 and self.by_layer:
            raise AdapterError(
                f"{self.adapter}: {self.source_key!r} updates a square {shape[0]}x{shape[1]} weight that may be a "
                "Linear (out, in) or a GPT-2 Conv1D (in, out) layer, and the base model does not say which "
                f"(the adapter's one fan_in_fan_out flag does not either): {ORIENTATION_FIX}"
            )
        return fitting[0] if fitting else self

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        shape = list(self.delta_shape())
        return {"kind": "lora", "rank": self.rank, "scale": self.scale, "layout": self.layout, "shape": shape}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not load(self.B).any()

    def delta_norm(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> float | None:
        """``||scale * B @ A||_F`` without forming B @ A: sqrt(sum((B^T B) * (A A^T))) * |scale| (DoRA: the
        update before its magnitudes rescale it)."""
        b = load(self.B).reshape(self.B.shape[0], -1).astype(np.float64)
        if not b.any():
            return 0.0
        a = load(self.A).reshape(self.A.shape[0], -1).astype(np.float64)
        # ||BA||_F^2 = trace(A^T B^T B A) = <B^T B, A A^T>; each Gram matrix is only r x r.
        squared = float(((b.T @ b) * (a @ a.T)).sum())
        return math.sqrt(max(squared, 0.0)) * abs(self.scale)


@dataclass(frozen=True)
class DoraDelta(LoraDelta):
    """DoRA: W' = m * (W + dW) / ||W0 + dW||, the norm taken per output feature of the *unmerged* base W0.

    ``output_dim`` is the axis that indexes output features (0 for Linear/Conv, 1 for fan_in_fan_out and
    embeddings), matching PEFT's merge. Along rows (0) each row block has all it needs; along columns (1) the norm
    runs over every row, so the edit takes the whole tensor.
    """

    magnitude: TensorRef | None = None
    output_dim: int = 0

    def refs(self) -> list[TensorRef]:
        return [self.A, self.B, self.magnitude] if self.magnitude is not None else [self.A, self.B]

    @property
    def whole_tensor(self) -> bool:
        return self.output_dim != 0

    @property
    def needs_base(self) -> bool:
        return True

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        err = super().shape_error(shape)
        if err or self.magnitude is None:
            return err
        if math.prod(self.magnitude.shape) != shape[self.output_dim]:
            return f"DoRA magnitude has {math.prod(self.magnitude.shape)} values for {shape[self.output_dim]} features"
        return None

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        assert self.magnitude is not None
        left, right = self.factors(ops)
        delta = ops.product(left[rows], right)
        unmerged = block if base is None else base
        magnitude = ops.cached(self, "magnitude", lambda: ops.load(self.magnitude).reshape(-1))
        if self.output_dim == 0:  # one feature per row: this block's rows are all its norm needs
            factor = magnitude[rows].reshape(-1, 1) / ops.norm(unmerged + delta, axis=1)
        else:  # one feature per column (the whole tensor is this block)
            factor = magnitude.reshape(1, -1) / ops.norm(unmerged + delta, axis=0)
        block += delta
        block *= factor

    def _flipped(self) -> LoraDelta:
        flipped = super()._flipped()
        return replace(flipped, output_dim=1 - self.output_dim)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": "dora"}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return False  # the magnitudes rescale rows even when lora_B is zero


@dataclass(frozen=True)
class FullDiff(Edit):
    """W += alpha * D (full-rank difference: ``.diff``, ``.diff_b``, ``.diff_m``)."""

    D: TensorRef
    alpha: float = 1.0

    def refs(self) -> list[TensorRef]:
        return [self.D]

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if math.prod(self.D.shape) != math.prod(shape):
            return f"the difference has shape {self.D.shape} but the base tensor is {tuple(shape)}"
        return None

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        diff = ops.span(self.D, rows, block.shape[1])
        if self.alpha != 1.0:
            diff *= np.float32(self.alpha)
        block += diff

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, alpha=self._times(self.alpha, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": "diff", "scale": self.alpha, "shape": list(self.D.shape)}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not load(self.D).any()

    def delta_norm(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> float | None:
        return frobenius_norm(np.asarray(load(self.D), dtype=F32)) * abs(self.alpha)


@dataclass(frozen=True)
class Replace(Edit):
    """W = T (PEFT ``modules_to_save``, trained biases, saved base layers).

    ``weight`` < 1 moves only part of the way from W to T. ``base_copy``: T is PEFT's saved copy of a wrapped
    layer's base weight, the weight every adapter's LoRA applies on (it goes first).
    """

    T: TensorRef
    weight: float = 1.0
    base_copy: bool = False

    def refs(self) -> list[TensorRef]:
        return [self.T]

    @property
    def overwrites(self) -> bool:
        return self.weight == 1.0

    @property
    def goes_first(self) -> bool:
        return self.base_copy

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if tuple(self.T.shape) != tuple(shape):
            return f"the replacement has shape {self.T.shape} but the base tensor is {tuple(shape)}"
        return None

    def new_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """A 2-D replacement with other rows but the same width resizes the vocabulary (saved whole by PEFT)."""
        saved = tuple(self.T.shape)
        if self.weight == 1.0 and len(saved) == 2 == len(shape) and saved[1] == shape[1] and saved != tuple(shape):
            return saved
        return None

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        value = ops.span(self.T, rows, block.shape[1])
        if self.weight == 1.0:
            block[...] = value
        else:  # block + w * (T - block)
            value -= block
            value *= np.float32(self.weight)
            block += value

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, weight=self._times(self.weight, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": "replace", "weight": self.weight, "shape": list(self.T.shape)}


@dataclass(frozen=True)
class RowReplace(Edit):
    """W[indices] = T (PEFT trainable tokens: the saved rows of an embedding replace the base's rows)."""

    T: TensorRef
    indices: tuple[int, ...]
    weight: float = 1.0  # < 1 moves those rows only part of the way, like Replace

    def refs(self) -> list[TensorRef]:
        return [self.T]

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2 or tuple(self.T.shape) != (len(self.indices), shape[1]):
            return f"{len(self.indices)} token rows of shape {self.T.shape} do not fit the base tensor {tuple(shape)}"
        if self.indices and not 0 <= min(self.indices) <= max(self.indices) < shape[0]:
            return f"token indices {min(self.indices)}..{max(self.indices)} are outside the {shape[0]} rows"
        return None

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        picked = [(k, i - rows.start) for k, i in enumerate(self.indices) if rows.start <= i < rows.stop]
        if not picked:
            return
        saved = ops.cached(self, "rows", lambda: ops.load(self.T))
        source, target = [k for k, _ in picked], [i for _, i in picked]
        values = saved[source]
        if self.weight != 1.0:  # block + w * (T - block), for those rows
            values = block[target] + np.float32(self.weight) * (values - block[target])
        block[target] = values

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, weight=self._times(self.weight, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": "tokens", "weight": self.weight, "shape": list(self.T.shape), "tokens": list(self.indices)}


@dataclass(frozen=True)
class BiasDelta(Edit):
    """bias += scale * b (PEFT ``lora_bias``: the bias of lora_B)."""

    b: TensorRef
    scale: float

    def refs(self) -> list[TensorRef]:
        return [self.b]

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if tuple(self.b.shape) != tuple(shape):
            return f"lora_B.bias has shape {self.b.shape} but the base bias is {tuple(shape)}"
        return None

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        bias = ops.span(self.b, rows, block.shape[1])
        bias *= np.float32(self.scale)
        block += bias

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": "bias", "scale": self.scale, "shape": list(self.b.shape)}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not load(self.b).any()

    def delta_norm(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> float | None:
        return frobenius_norm(np.asarray(load(self.b), dtype=F32)) * abs(self.scale)


@dataclass(frozen=True)
class RowSlice(Edit):
    """Rows ``start:stop`` of ``inner``'s update, whose target has ``total`` rows, on a tensor of those rows alone:
    the q, k or v rows of a LoRA on a fused ``qkv`` merged into a separate ``to_q``/``to_k``/``to_v`` (B splits by
    rows, A is shared), or one half of a weight that two layouts store with its halves swapped (names/paired.py)."""

    inner: Edit
    start: int
    stop: int
    total: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", self.inner.adapter)
        object.__setattr__(self, "source_key", self.inner.source_key)

    @property
    def whole_tensor(self) -> bool:
        return self.inner.whole_tensor

    @property
    def needs_base(self) -> bool:
        return self.inner.needs_base

    @property
    def overwrites(self) -> bool:
        return self.inner.overwrites

    @property
    def goes_first(self) -> bool:
        return self.inner.goes_first

    @property
    def reads(self) -> tuple[str, ...]:
        return self.inner.reads

    def _whole(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.total, *shape[1:])

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        self.inner.apply(block, slice(rows.start + self.start, rows.stop + self.start), ops, base)

    def refs(self) -> list[TensorRef]:
        return self.inner.refs()

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if not shape or shape[0] != self.stop - self.start:
            return f"rows {self.start}:{self.stop} of the adapter's update do not fit a tensor of shape {tuple(shape)}"
        if self.inner.whole_tensor:
            return "the update takes a norm across all rows of the fused tensor, which its rows alone cannot give"
        return self.inner.shape_error(self._whole(shape))

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        inner = self.inner.oriented(self._whole(shape), conv1d) if shape else self.inner
        return self if inner is self.inner else replace(self, inner=inner)

    def bound(self, base: Checkpoint, key: str) -> Edit:
        inner = self.inner.bound(base, key)
        return self if inner is self.inner else replace(self, inner=inner)

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, inner=self.inner.scaled(strength))

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "rows": [self.start, self.stop]}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return self.inner.no_effect(load)  # all of the update changes nothing, so its rows change nothing


@dataclass(frozen=True)
class TargetedEdit:
    """An edit and the tensor it targets, named as the adapter names it (before matching to the base).

    ``rows`` = (start, stop) addresses part of the tensor (rows of a fused weight: ``to_q`` of a ``qkv``); the
    edit's shape is then checked against those rows alone. ``optional``: the target may be missing from the base
    (IA3 scales a layer's bias where the layer has one), and the edit is then dropped.
    """

    target: str
    edit: Edit
    rows: tuple[int, int] | None = None
    optional: bool = False
