"""PEFT AdaLoRA: W += B @ (A * E) * scaling / (ranknum + 1e-5), as PEFT merges it (peft/tuners/adalora/layer.py).

``lora_E`` holds the singular values (r, 1). ``ranknum`` is the rank a layer was created with, ``init_r``: PEFT
does not save it (it is always ``float(init_r)``) and keeps it when the rank allocator prunes a layer, so a pruned
layer keeps its scale. ``scaling`` is ``lora_alpha``, or the layer's rank when ``lora_alpha`` is 0 or less. The
pruned ranks are the config's ``rank_pattern`` (module.lora_E -> which of the ``init_r`` ranks remain); the saved
factors hold only those. PEFT wraps Linear, GPT-2 Conv1D and Conv2d layers (``lora_A`` is then (r, in * kernel)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..edits import Edit, FactoredUpdate, TargetedEdit, TensorRef, fp32_of, lora_rank_error, transposed_for
from ..errors import AdapterError
from ..peft_flags import ALPHA_FIX, CONFIG_NAME, finite_number, positive_int
from .registry import Tuner, TunerInput, register_tuner

ADALORA_PARAMS = ("lora_A", "lora_B", "lora_E", "ranknum")
RANKNUM_EPSILON = 1e-5  # PEFT divides by ranknum + 1e-5


def _fp32(ref: TensorRef) -> np.ndarray:
    """A tensor's values in fp32 numpy, as 2-D rows."""
    values = fp32_of(ref)
    return values.reshape(values.shape[0], -1)


@dataclass(frozen=True)
class AdaLoraDelta(FactoredUpdate):
    """W += scale * B @ (A * E): an SVD-shaped LoRA (``scale`` = scaling / (ranknum + 1e-5) times any strength).

    ``transposed``: the target is a GPT-2 Conv1D weight (in, out), the update's transpose (set by :meth:`oriented`
    from the base, as PEFT decides per layer). A conv kernel (out, in, *kernel) takes the update as its 2-D view.
    """

    A: TensorRef
    B: TensorRef
    E: TensorRef
    scale: float
    transposed: bool = False

    def refs(self) -> list[TensorRef]:
        return [self.A, self.B, self.E]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def _update_shape(self) -> tuple[int, int]:
        return (self.B.shape[0], math.prod(self.A.shape[1:]))

    def _fits(self, shape: tuple[int, ...], transposed: bool) -> bool:
        out, inputs = self._update_shape()
        if transposed:
            return tuple(shape) == (inputs, out)
        return len(shape) >= 2 and (shape[0], math.prod(shape[1:])) == (out, inputs)

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        err = lora_rank_error(self.A.shape, self.B.shape)
        if err:
            return err
        if math.prod(self.E.shape) != self.rank:
            return f"lora_E {tuple(self.E.shape)} does not hold the {self.rank} singular values of lora_A"
        if not self._fits(shape, self.transposed):
            update = self._update_shape()[::-1] if self.transposed else self._update_shape()
            return f"the adapter's update has shape {update} but the base tensor is {tuple(shape)}"
        return None

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        """Linear or GPT-2 Conv1D by ``conv1d``; unknown, by the one orientation the shape fits (square: refused)."""
        if len(shape) != 2:  # a conv kernel: never a Conv1D, whatever the adapter's one fan_in_fan_out flag says
            return replace(self, transposed=False)
        transposed = transposed_for(self, shape, conv1d, lambda t: self._fits(shape, t), self.transposed)
        return replace(self, transposed=transposed)

    def _factors(self) -> tuple[np.ndarray, np.ndarray]:
        right = _fp32(self.A) * _fp32(self.E).reshape(-1, 1)  # A * E: each rank's singular value
        return _fp32(self.B) * np.float32(self.scale), right

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        out, inputs = self._update_shape()
        shape = [inputs, out] if self.transposed else [out, inputs]
        return {"kind": "adalora", "rank": self.rank, "scale": self.scale, "shape": shape}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not np.asarray(load(self.B)).any() or not np.asarray(load(self.E)).any()

    def delta_norm(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> float | None:
        """``||scale * B @ (A * E)||_F`` through the r x r Gram matrices (as LoraDelta's)."""
        b = np.asarray(load(self.B), dtype=np.float64).reshape(self.B.shape[0], -1)
        a = np.asarray(load(self.A), dtype=np.float64).reshape(self.A.shape[0], -1)
        a = a * np.asarray(load(self.E), dtype=np.float64).reshape(-1, 1)
        squared = float(((b.T @ b) * (a @ a.T)).sum())
        return math.sqrt(max(squared, 0.0)) * abs(self.scale)


def _rank_pattern(raw: dict[str, Any], source: str) -> dict[str, int]:
    """``rank_pattern``: module -> how many of its ``init_r`` ranks the allocator kept (PEFT's boolean masks)."""
    value = raw.get("rank_pattern")
    if value is None:
        return {}
    fix = f"fix it in {CONFIG_NAME} (AdaLoRA saves one list of true/false per module)"
    if not isinstance(value, dict):
        raise AdapterError(f"{source}: rank_pattern must map modules to lists of true/false: {fix}")
    kept: dict[str, int] = {}
    for name, mask in value.items():
        if not isinstance(name, str) or not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask):
            raise AdapterError(f"{source}: rank_pattern[{str(name)[:60]!r}] is not a list of true/false: {fix}")
        # PEFT's key is the lora_E parameter's name, "<module>.lora_E" (".<adapter>" after it before saving)
        kept[name.split(".lora_E")[0] if ".lora_E" in name else name.rpartition(".")[0]] = sum(mask)
    return kept


def read_adalora(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every AdaLoRA module's update, and module -> rank (a module pruned to rank 0 has no update)."""
    source, label, checkpoint = tuner_input.source, tuner_input.label, tuner_input.checkpoint
    raw = tuner_input.config.raw
    if raw.get("use_dora"):
        raise AdapterError(f"{source}: use_dora is set, but AdaLoRA has no DoRA (PEFT refuses it): fix {CONFIG_NAME}")
    init_r = positive_int(raw.get("init_r", 12), f"{source}: init_r", "set it to the rank AdaLoRA started from")
    alpha = finite_number(raw.get("lora_alpha", 8), f"{source}: lora_alpha", ALPHA_FIX, AdapterError)
    kept = _rank_pattern(raw, source)
    ranknum = float(np.float32(init_r) + np.float32(RANKNUM_EPSILON))  # PEFT adds in fp32
    edits: list[TargetedEdit] = []
    ranks: dict[str, int] = {}
    for module, slots in tuner_input.modules.items():
        missing = [p for p in ("lora_A", "lora_B", "lora_E") if p not in slots]
        if missing:
            raise AdapterError(f"{source}: module {module!r} has no {missing[0]} tensor; the adapter is incomplete")
        a, b, e = (TensorRef(checkpoint, slots[p]) for p in ("lora_A", "lora_B", "lora_E"))
        rank = a.shape[0] if a.shape else 0
        expected = kept.get(module, init_r)
        if rank != expected or tuple(b.shape[1:2]) != (rank,) or math.prod(e.shape) != rank:
            why = f"rank_pattern keeps {expected}" if module in kept else f"init_r is {init_r} (no rank_pattern entry)"
            raise AdapterError(
                f"{source}: module {module!r} saves rank {rank} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                f"lora_E {tuple(e.shape)}) but {CONFIG_NAME}'s {why}; the config does not belong to these weights"
            )
        if "ranknum" in slots:  # older files: the value PEFT would use, which must be init_r's
            saved = np.asarray(TensorRef(checkpoint, slots["ranknum"]).load(), dtype=np.float64).reshape(-1)
            if saved.size != 1 or (rank and float(saved[0]) != float(init_r)):
                raise AdapterError(
                    f"{source}: {slots['ranknum']!r} is {saved.tolist()[:4]} but init_r is {init_r}; PEFT scales by "
                    f"init_r: fix init_r in {CONFIG_NAME} or drop the ranknum tensor"
                )
        ranks[module] = rank
        if rank == 0:  # pruned away: PEFT's update is an empty product
            continue
        scaling = alpha if alpha > 0 else float(rank)
        transposed = tuner_input.config.fan_in_fan_out  # a hint only: the plan orients it by the layer
        edit = AdaLoraDelta(a, b, e, scaling / ranknum, transposed, adapter=label, source_key=slots["lora_B"])
        edits.append(TargetedEdit(f"{module}.weight", edit))
    return edits, ranks


TUNER = register_tuner(
    Tuner(
        "ADALORA",
        ADALORA_PARAMS,
        read_adalora,
        description="AdaLoRA (W += B (A * E) * alpha / init_r)",
        extra={"layers": ("linear", "gpt2_conv1d", "conv2d")},
    )
)
