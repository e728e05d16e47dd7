"""PEFT FourierFT: W += scaling * Re(ifft2(S)), S the (out, in) spectrum zero but at ``n_frequency`` positions.

PEFT draws the positions with ``torch.randperm(out * in)`` from a generator seeded with ``random_loc_seed``
and does not save them, so torch is needed to draw them again (the rest is numpy). The positions depend on which
side is ``in``: a GPT-2 ``Conv1D`` layer and a ``Linear`` one of the same shape differ, so the layer's type must be
established (PEFT's FourierFT takes those two only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..arrays import F32
from ..conv1d import ORIENTATION_FIX
from ..edits import Array, BlockOps, Edit, TargetedEdit, TensorRef
from ..errors import AdapterError
from ..peft_flags import finite_number
from ..torch_bridge import require_torch
from .peft_layer import as_numpy, layer_kind
from .registry import Tuner, TunerInput, register_tuner

LAYERS = ("linear", "gpt2_conv1d")
DEFAULT_SCALING = 150.0  # FourierFTConfig's defaults
DEFAULT_SEED = 777


def frequency_positions(out_features: int, in_features: int, n_frequency: int, seed: int) -> np.ndarray:
    """The (row, col) positions of the spectrum, as PEFT's FourierFT layer draws them (2, n_frequency)."""
    torch = require_torch("FourierFT (its frequency positions are drawn with torch's generator)")
    drawn = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    drawn = drawn.numpy()
    return np.stack([drawn // in_features, drawn % in_features])


@dataclass(frozen=True)
class FourierDelta(Edit):
    """W += scaling * Re(ifft2(S)) on a Linear (out, in) weight, its transpose on a Conv1D (in, out) weight."""

    spectrum: TensorRef
    scaling: float
    seed: int
    module: str = ""
    transposed: bool = False
    shape: tuple[int, ...] = ()  # the target's, set by oriented

    def refs(self) -> list[TensorRef]:
        return [self.spectrum]

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        kind = layer_kind(self.module, tuple(shape), conv1d, LAYERS)
        if kind not in LAYERS:
            raise AdapterError(
                f"{self.adapter}: {self.source_key!r}: PEFT's FourierFT takes Linear and GPT-2 Conv1D layers, and "
                f"{self.module!r} {tuple(shape)} is not established as either: {ORIENTATION_FIX}"
            )
        return replace(self, transposed=kind == "gpt2_conv1d", shape=tuple(shape))

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        if len(shape) != 2:
            return f"FourierFT updates 2-D weights, not one of shape {tuple(shape)}"
        n = int(np.prod(self.spectrum.shape))
        if len(self.spectrum.shape) != 1 or n > shape[0] * shape[1]:
            return f"a spectrum of shape {self.spectrum.shape} does not fit a {shape[0]}x{shape[1]} weight"
        return None

    def delta(self, ops: BlockOps) -> Array:
        """The whole update in the target's layout, computed once per tensor."""

        def make() -> Array:
            rows_, cols_ = self.shape
            out_features, in_features = (cols_, rows_) if self.transposed else (rows_, cols_)
            values = as_numpy(self.spectrum.load())
            rows, cols = frequency_positions(out_features, in_features, values.size, self.seed)
            dense = np.zeros((out_features, in_features), dtype=np.complex64)
            dense[rows, cols] = values
            delta = (np.fft.ifft2(dense).real * np.float32(self.scaling)).astype(F32)
            return ops.array(np.ascontiguousarray(delta.T if self.transposed else delta))

        return ops.cached(self, "delta", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        if not self.shape:
            raise AdapterError(f"{self.adapter}: {self.source_key!r} was not placed by the plan")
        block += self.delta(ops)[rows]

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scaling=self._times(self.scaling, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": "fourierft", "scale": self.scaling, "n_frequency": int(np.prod(self.spectrum.shape))}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not load(self.spectrum).any()


def _config_numbers(tuner_input: TunerInput) -> tuple[float, int]:
    """FourierFT's ``scaling`` and ``random_loc_seed`` from adapter_config.json, each checked."""
    raw, source = tuner_input.config.raw, tuner_input.source
    scaling = finite_number(
        raw.get("scaling", DEFAULT_SCALING),
        f"{source}: scaling",
        "set it to the FourierFT scaling trained with",
        AdapterError,
    )
    seed = raw.get("random_loc_seed", DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AdapterError(
            f"{source}: random_loc_seed is {seed!r}, not a whole number: PEFT draws the frequency positions from it; "
            "set it to the seed the adapter was trained with"
        )
    return scaling, seed


def read_fourierft(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every FourierFT module's update, and module -> n_frequency."""
    scaling, seed = _config_numbers(tuner_input)
    edits: list[TargetedEdit] = []
    sizes: dict[str, int] = {}
    for module, slots in tuner_input.modules.items():
        key = slots.get("fourierft_spectrum")
        if key is None or len(slots) != 1:
            raise AdapterError(
                f"{tuner_input.source}: module {module!r} holds {sorted(slots)}, not one FourierFT spectrum"
            )
        spectrum = TensorRef(tuner_input.checkpoint, key)
        edit = FourierDelta(spectrum, scaling, seed, module=module, adapter=tuner_input.label, source_key=key)
        edits.append(TargetedEdit(f"{module}.weight", edit))
        sizes[module] = int(np.prod(spectrum.shape))
    return edits, sizes


TUNER = register_tuner(
    Tuner(
        "FOURIERFT",
        ("fourierft_spectrum",),
        read_fourierft,
        description="W += scaling * Re(ifft2(sparse spectrum)) (positions drawn with torch's generator)",
        extra={"layers": LAYERS},
    )
)
