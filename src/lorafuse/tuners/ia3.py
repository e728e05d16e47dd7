"""PEFT IA3: each wrapped layer's weight is multiplied by one learned vector ``ia3_l``, as PEFT merges it.

A feed-forward layer (``feedforward_modules`` in the config) scales its input features (columns of a Linear weight,
rows of a GPT-2 Conv1D one, input channels of a conv kernel); any other layer scales its output features and its
bias. PEFT wraps Linear, GPT-2 Conv1D, Conv2d and Conv3d layers (peft/tuners/ia3/layer.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ..arrays import F32
from ..conv1d import ORIENTATION_FIX
from ..edits import Array, BlockOps, Edit, TargetedEdit, TensorRef
from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME
from .registry import Tuner, TunerInput, register_tuner

IA3_PARAMS = ("ia3_l",)
# How the vector meets the weight: "linear" (nn.Linear, (out, in)), "conv1d" (GPT-2 Conv1D, (in, out)), "conv"
# (Conv2d/3d, (out, in / groups, *kernel)), "bias" (the layer's bias, (out,)); "2d" until the plan orients it.
Layer = Literal["2d", "linear", "conv1d", "conv", "bias"]


def _values(ref: TensorRef) -> np.ndarray:
    """The vector's values, flat, in fp32 numpy (the runtime's in-memory refs load torch tensors)."""
    return np.asarray(ref.load(), dtype=F32).reshape(-1)


@dataclass(frozen=True)
class Ia3Scale(Edit):
    """W *= l along one axis of the weight: PEFT IA3's merge (``torch.mul(weight, ia3_l)``, broadcast).

    ``feedforward``: ``l`` scales the layer's input features, else its output features. ``layer`` says how those
    features lie in the target (see ``Layer``); a 2-D weight's is set by :meth:`oriented`, from the base (Linear
    or GPT-2 Conv1D), as PEFT decides per layer. ``shape`` is the target's, also set by :meth:`oriented` (a conv's
    groups follow from it).

    Strength: PEFT has none for IA3. A strength ``s`` here moves the vector toward 1, ``l' = 1 + s * (l - 1)``:
    0 leaves the weight as it is, 1 is PEFT's merge, and two strengths multiply as they do for an additive edit.
    The change depends on the base, so :meth:`delta_norm` is None.
    """

    vector: TensorRef
    feedforward: bool
    layer: Layer = "2d"
    shape: tuple[int, ...] = ()
    strength: float = 1.0

    def refs(self) -> list[TensorRef]:
        return [self.vector]

    @property
    def features(self) -> int:
        return math.prod(self.vector.shape)

    def _fits(self, layer: Layer, shape: tuple[int, ...]) -> bool:
        n = self.features
        if layer == "bias":
            return len(shape) == 1 and shape[0] == n
        if layer == "conv":
            if len(shape) != len(self.vector.shape):  # PEFT's vector has the kernel's dimensions
                return False
            if not self.feedforward:
                return shape[0] == n
            # input channels = (in / groups) * groups: the groups must split the output channels too
            return shape[1] > 0 and n % shape[1] == 0 and shape[0] % (n // shape[1]) == 0
        if len(shape) != 2:
            return False
        inputs = shape[1] if layer == "linear" else shape[0]
        outputs = shape[0] if layer == "linear" else shape[1]
        return (inputs if self.feedforward else outputs) == n

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        """Fix how the vector meets a target of ``shape``: a 2-D weight is Linear or GPT-2 Conv1D by ``conv1d``;
        unknown, by the one orientation the shape fits; a square weight that fits both is refused."""
        shape = tuple(shape)
        if self.layer != "2d" or len(shape) != 2:
            return replace(self, shape=shape)
        if conv1d is not None:
            return replace(self, layer="conv1d" if conv1d else "linear", shape=shape)
        fitting = [layer for layer in ("linear", "conv1d") if self._fits(layer, shape)]
        if len(fitting) == 2:
            raise AdapterError(
                f"{self.adapter}: {self.source_key!r} scales a square {shape[0]}x{shape[1]} weight that may be a "
                "Linear (out, in) or a GPT-2 Conv1D (in, out) layer, and the base model does not say which: "
                f"{ORIENTATION_FIX}"
            )
        return replace(self, layer=fitting[0] if fitting else "linear", shape=shape)

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        vector = tuple(self.vector.shape)
        if self.layer in ("2d", "linear", "conv1d"):
            expected = (1, self.features) if self.feedforward else (self.features, 1)
            if vector != expected:
                return f"ia3_l {vector} is not a {'feed-forward' if self.feedforward else 'non-feed-forward'} vector"
        what = "input" if self.feedforward else "output"
        if not self._fits("linear" if self.layer == "2d" else self.layer, tuple(shape)):
            return f"ia3_l scales {self.features} {what} features but the base tensor is {tuple(shape)}"
        return None

    def _axis(self) -> str:
        """Which axis of the 2-D block view the vector runs along: "rows" or "columns"."""
        if self.layer in ("bias", "conv"):
            return "columns" if self.feedforward else "rows"
        transposed = self.layer == "conv1d"
        return "rows" if self.feedforward == transposed else "columns"

    def _factor(self, ops: BlockOps) -> Array:
        """The multiplier in fp32, shaped to broadcast on the block (once per tensor): a column for rows, a row
        for columns, and for a grouped conv one row per group."""

        def make() -> Array:
            values = _values(self.vector)
            if self.strength != 1.0:  # 1 + s * (l - 1), in fp32 like the merge
                values = np.float32(1) + np.float32(self.strength) * (values - np.float32(1))
            if self._axis() == "rows":
                return ops.array(np.ascontiguousarray(values.reshape(-1, 1)))
            if self.layer != "conv":
                return ops.array(np.ascontiguousarray(values.reshape(1, -1)))
            per_group, kernel = self.shape[1], math.prod(self.shape[2:])
            # column c * kernel + k of a kernel row is input channel (its group's first + c): one row per group
            grouped = np.repeat(values.reshape(-1, per_group), kernel, axis=1)
            return ops.array(np.ascontiguousarray(grouped))

        return ops.cached(self, "factor", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        factor = self._factor(ops)
        if self._axis() == "rows":
            block *= factor[rows]
            return
        if self.layer != "conv" or factor.shape[0] == 1:
            block *= factor
            return
        per_group = self.shape[0] // factor.shape[0]  # output channels per group: rows of the kernel
        for group in range(rows.start // per_group, -(-rows.stop // per_group)):
            low, high = max(rows.start, group * per_group), min(rows.stop, (group + 1) * per_group)
            block[low - rows.start : high - rows.start] *= factor[group : group + 1]

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, strength=self._times(self.strength, strength))

    def describe(self) -> dict[str, Any]:
        scales = "input features" if self.feedforward else "output features"
        return {"kind": "ia3", "scales": scales, "features": self.features, "strength": self.strength}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return self.strength == 0.0 or not (np.asarray(load(self.vector)) != 1).any()


def _feedforward_modules(raw: dict[str, Any], source: str) -> str | list[str]:
    """``feedforward_modules``: a regular expression (matched against whole module names) or module-name ends."""
    value = raw.get("feedforward_modules")
    if value is None:
        return []
    if isinstance(value, str):
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise AdapterError(
                f"{source}: feedforward_modules {value[:60]!r} is not a valid regular expression ({exc}): fix it in "
                f"{CONFIG_NAME}"
            ) from None
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AdapterError(
        f"{source}: feedforward_modules must be a list of module names or a regular expression, not "
        f"{str(value)[:60]}: fix it in {CONFIG_NAME}"
    )


def is_feedforward(module: str, feedforward: str | list[str]) -> bool:
    """Whether PEFT treats ``module`` as feed-forward: a regex matches the whole name; a list entry ends it (as a
    plain string end, the way PEFT's IA3 checks it)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module.endswith(name) for name in feedforward)


def read_ia3(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every IA3 module's weight scaling (and, for a non-feed-forward layer, its bias's), and module -> features."""
    source, label = tuner_input.source, tuner_input.label
    feedforward = _feedforward_modules(tuner_input.config.raw, source)
    edits: list[TargetedEdit] = []
    sizes: dict[str, int] = {}
    for module, slots in tuner_input.modules.items():
        key = slots.get("ia3_l")
        if key is None:
            raise AdapterError(f"{source}: {slots[next(iter(slots))]!r} is not an ia3_l vector PEFT saves")
        ref = TensorRef(tuner_input.checkpoint, key)
        shape, ff = tuple(ref.shape), is_feedforward(module, feedforward)
        if len(shape) == 2:  # Linear / Conv1D: (1, in) for a feed-forward layer, (out, 1) for any other
            if shape != ((1, shape[1]) if ff else (shape[0], 1)):
                kind = "feed-forward" if ff else "not feed-forward"
                raise AdapterError(
                    f"{source}: {key!r} has shape {shape} but {CONFIG_NAME}'s feedforward_modules makes "
                    f"{module!r} {kind}; the config does not belong to these weights"
                )
            layer: Layer = "2d"
        elif len(shape) in (4, 5) and shape[0] == 1 and all(d == 1 for d in shape[2:]):
            layer = "conv"  # Conv2d/3d: (1, channels, 1, ...) either way; the config alone says which channels
        else:
            raise AdapterError(f"{source}: {key!r} has shape {shape}, which is no IA3 vector of a layer PEFT wraps")
        edit = Ia3Scale(ref, ff, layer, adapter=label, source_key=key)
        edits.append(TargetedEdit(f"{module}.weight", edit))
        if not ff:  # PEFT scales the bias of a non-feed-forward layer too, where the layer has one
            bias = Ia3Scale(ref, False, "bias", adapter=label, source_key=key)
            edits.append(TargetedEdit(f"{module}.bias", bias, optional=True))
        sizes[module] = edit.features
    return edits, sizes


TUNER = register_tuner(
    Tuner(
        "IA3",
        IA3_PARAMS,
        read_ia3,
        description="IA3 (W scaled by a learned vector, inputs or outputs)",
        extra={"layers": ("linear", "gpt2_conv1d", "conv2d", "conv3d")},
    )
)
