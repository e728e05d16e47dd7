"""Edit kinds: each changes one base tensor, in fp32, in place.

An adapter format reads its file into a list of :class:`TargetedEdit` (target tensor name + edit); the plan
maps targets onto base tensors and the engine applies the edits of one tensor in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from .errors import AdapterError, NonFiniteError
from .io.checkpoint import Checkpoint
from .peft_flags import finite_number

Layout = Literal["linear", "transposed", "conv"]


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

    def load(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor as fp32 (on ``device`` when given)."""
        return self.checkpoint.get(self.name).to(device=device).to(torch.float32)


def require_finite(ref: TensorRef, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (``ref`` as loaded) when it holds no NaN/Inf; else :class:`NonFiniteError` naming file and tensor."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{ref.file}: tensor {ref.name!r} holds NaN or Inf; the adapter is broken")
    return tensor


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


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


@dataclass
class Edit:
    """Base class. ``adapter`` labels where the edit came from (for errors and reports)."""

    adapter: str = field(default="", kw_only=True)
    source_key: str = field(default="", kw_only=True)

    def refs(self) -> list[TensorRef]:
        return []

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        """Why this edit cannot apply to a base tensor of ``shape``, or None when it fits."""
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Return the edited ``weight`` (fp32; may be modified in place). ``base`` is the unedited base tensor."""
        raise NotImplementedError

    @property
    def touches_values(self) -> bool:
        return True


@dataclass
class LoraDelta(Edit):
    """W += scale * B @ A, in the layout of the base tensor.

    ``linear``: W is (out, in). ``transposed``: W is (in, out) (fan_in_fan_out Conv1D, and embeddings where PEFT
    stores A as (r, num_embeddings) and B as (dim, r)). ``conv``: W is (out, in, *kernel), B is (out, r, 1, ...),
    A is (r, in, *kernel).
    """

    A: TensorRef
    B: TensorRef
    scale: float
    layout: Layout = "linear"

    def refs(self) -> list[TensorRef]:
        return [self.A, self.B]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_shape(self) -> tuple[int, ...]:
        out, rank = self.B.shape[0], self.B.shape[1] if len(self.B.shape) > 1 else 1
        if self.layout == "conv":
            return (out, *self.A.shape[1:])
        if self.layout == "transposed":
            return (self.A.shape[1], out)
        del rank
        return (out, self.A.shape[1])

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        rank_error = lora_rank_error(self.A.shape, self.B.shape)
        if rank_error:
            return rank_error
        if tuple(shape) != self.delta_shape():
            return f"the adapter's update has shape {self.delta_shape()} but the base tensor is {tuple(shape)}"
        return None

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The full fp32 update scale * B @ A in the base tensor's layout."""
        a, b = self.A.load(device), self.B.load(device)
        b2 = b.reshape(b.shape[0], -1)
        a2 = a.reshape(a.shape[0], -1)
        d = (b2 @ a2) * self.scale
        if self.layout == "transposed":
            return d.T
        return d.reshape(self.delta_shape())

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        a, b = self.A.load(weight.device), self.B.load(weight.device)
        b2 = b.reshape(b.shape[0], -1)
        a2 = a.reshape(a.shape[0], -1)
        if self.layout == "transposed":
            weight.addmm_(a2.T, b2.T, alpha=self.scale)
        else:
            weight.view(weight.shape[0], -1).addmm_(b2, a2, alpha=self.scale)
        return weight


@dataclass
class DoraDelta(LoraDelta):
    """DoRA: W' = m * (W + dW) / ||W0 + dW||, the norm taken per output feature of the *unmerged* base W0.

    ``output_dim`` is the axis that indexes output features (0 for Linear/Conv, 1 for fan_in_fan_out and
    embeddings), matching PEFT's merge.
    """

    magnitude: TensorRef | None = None
    output_dim: int = 0

    def refs(self) -> list[TensorRef]:
        return [self.A, self.B, self.magnitude] if self.magnitude is not None else [self.A, self.B]

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        err = super().shape_error(shape)
        if err or self.magnitude is None:
            return err
        if _numel(self.magnitude.shape) != shape[self.output_dim]:
            return f"DoRA magnitude has {_numel(self.magnitude.shape)} values for {shape[self.output_dim]} features"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        assert self.magnitude is not None
        delta = self.delta(weight.device)
        dims = tuple(d for d in range(base.dim()) if d != self.output_dim)
        norm = torch.linalg.vector_norm(base + delta, dim=dims, keepdim=True)
        factor = self.magnitude.load(weight.device).reshape(norm.shape) / norm
        weight.add_(delta).mul_(factor)
        return weight


@dataclass
class FullDiff(Edit):
    """W += alpha * D (full-rank difference: ``.diff``, ``.diff_b``, ``.diff_m``)."""

    D: TensorRef
    alpha: float = 1.0

    def refs(self) -> list[TensorRef]:
        return [self.D]

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if _numel(self.D.shape) != _numel(shape):
            return f"the difference has shape {self.D.shape} but the base tensor is {tuple(shape)}"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        weight.add_(self.D.load(weight.device).reshape(weight.shape), alpha=self.alpha)
        return weight


@dataclass
class Replace(Edit):
    """W = T (PEFT ``modules_to_save``, trained biases, saved base layers)."""

    T: TensorRef
    weight: float = 1.0  # < 1 moves only part of the way from W to T

    def refs(self) -> list[TensorRef]:
        return [self.T]

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if tuple(self.T.shape) != tuple(shape):
            return f"the replacement has shape {self.T.shape} but the base tensor is {tuple(shape)}"
        return None

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        if self.weight == 1.0:
            value = self.T.load(weight.device)
            if value.shape != weight.shape:  # a resized vocabulary (plan.py): a copy, as later edits work in place
                return value.clone()
            return weight.copy_(value)
        else:
            weight.lerp_(self.T.load(weight.device), self.weight)
        return weight


@dataclass
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

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(self.indices, dtype=torch.long, device=weight.device)
        rows = self.T.load(weight.device)
        if self.weight != 1.0:
            rows = weight.index_select(0, index).lerp_(rows, self.weight)
        return weight.index_copy_(0, index, rows)


@dataclass
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

    def apply(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        weight.add_(self.b.load(weight.device), alpha=self.scale)
        return weight


@dataclass
class TargetedEdit:
    """An edit and the tensor it targets, named as the adapter names it (before matching to the base)."""

    target: str
    edit: Edit


def with_strength(edit: Edit, strength: float) -> Edit:
    """A copy of ``edit`` whose effect is scaled by ``strength`` (the per-adapter ``--weight``); the product must
    stay finite (a huge alpha times a huge strength overflows)."""
    if strength == 1.0:
        return edit

    def scaled(value: float) -> float:
        what = f"{edit.adapter}: the scale of {edit.source_key!r} times the adapter's strength {strength:g}"
        return finite_number(value * strength, what, "use a smaller strength or lora_alpha", AdapterError)

    if isinstance(edit, (LoraDelta, BiasDelta)):
        return replace(edit, scale=scaled(edit.scale))
    if isinstance(edit, FullDiff):
        return replace(edit, alpha=scaled(edit.alpha))
    if isinstance(edit, (Replace, RowReplace)):
        return replace(edit, weight=scaled(edit.weight))
    raise TypeError(f"unknown edit kind {type(edit).__name__}")
