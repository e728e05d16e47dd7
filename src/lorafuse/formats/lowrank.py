"""Shared reader for single-file LoRA formats that name tensors ``<module>.<slot>`` (kohya, diffusion, plain).

Each format declares which key suffixes it accepts and how a module name in the file maps to a base module; this
module groups the keys by module and turns each group into edits:

- ``up``/``down`` (``lora_up``/``lora_down`` or ``lora_B``/``lora_A``) with optional ``alpha``: W += (alpha / rank)
  * up @ down (scale 1 without alpha), for Linear (2-D) and Conv (1x1 and kxk) weights;
- ``diff``/``diff_b``/``diff_m``: full differences added to ``.weight``/``.bias``/``.modulation``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..edits import FullDiff, LoraDelta, TargetedEdit, TensorRef, lora_rank_error
from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..peft_flags import finite_number

DIFF_TARGETS = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
# Tensor-name suffixes shared by the kohya and diffusion layouts, and the role of each.
UP_DOWN_DIFF_SUFFIXES = {
    ".lora_up.weight": "up",
    ".lora_down.weight": "down",
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".diff_m": "diff_m",
}
ShapeOf = Callable[[str], "tuple[int, ...] | None"]


@dataclass
class LowRankAdapter:
    """Edits read from a single-file adapter, with the LoRA module ranks for reports."""

    edits: list[TargetedEdit]
    modules: dict[str, int] = field(default_factory=dict)


def split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    """(module, slot) for a key ending in one of ``suffixes`` (suffix -> slot), longest suffix first."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffixes[suffix]
    return None


def read_lowrank(
    checkpoint: Checkpoint,
    label: str,
    suffixes: Mapping[str, str],
    resolve: Callable[[str, str], str] | None = None,
    shape_of: ShapeOf | None = None,
) -> LowRankAdapter:
    """Group ``checkpoint``'s keys by module and build edits.

    ``suffixes`` maps a key suffix (``.lora_up.weight``) to its slot (``up``, ``down``, ``alpha``, ``diff``,
    ``diff_b``, ``diff_m``); ``resolve(module, key)`` maps a module name in the file to the target module name
    (identity when None); ``shape_of(target)`` gives the base tensor's shape when known, to lay out conv LoRAs.
    """
    source = str(checkpoint.files[0])
    groups: dict[str, dict[str, str]] = {}
    for key in checkpoint.keys():
        parts = split_key(key, suffixes)
        if parts is None:
            raise AdapterError(
                f"{source}: tensor {key!r} is not a LoRA tensor this format understands "
                f"(expected names ending in {', '.join(sorted(suffixes))}); pass --adapter-format if it was misdetected"
            )
        module, slot = parts
        groups.setdefault(module, {})[slot] = key
    edits: list[TargetedEdit] = []
    modules: dict[str, int] = {}
    for module, slots in groups.items():
        target = resolve(module, next(iter(slots.values()))) if resolve else module
        for slot, attr in DIFF_TARGETS.items():
            if slot in slots:
                key = slots[slot]
                diff = FullDiff(TensorRef(checkpoint, key), adapter=label, source_key=key)
                edits.append(TargetedEdit(f"{target}.{attr}", diff))
        if "up" in slots or "down" in slots:
            edit = _lora_edit(checkpoint, slots, module, target, label, source, shape_of)
            modules[target] = edit.rank
            edits.append(TargetedEdit(f"{target}.weight", edit))
        elif "alpha" in slots:
            raise AdapterError(f"{source}: {slots['alpha']!r} has no lora_up/lora_down pair; the file is incomplete")
    return LowRankAdapter(edits, modules)


def _lora_edit(
    checkpoint: Checkpoint,
    slots: dict[str, str],
    module: str,
    target: str,
    label: str,
    source: str,
    shape_of: ShapeOf | None,
) -> LoraDelta:
    if "up" not in slots or "down" not in slots:
        missing = "up (lora_up / lora_B)" if "up" not in slots else "down (lora_down / lora_A)"
        raise AdapterError(f"{source}: module {module!r} has no {missing} tensor; the adapter file is incomplete")
    down, up = TensorRef(checkpoint, slots["down"]), TensorRef(checkpoint, slots["up"])
    if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape):
        raise AdapterError(
            f"{source}: {slots['down']!r} {down.shape} and {slots['up']!r} {up.shape} "
            "are not a Linear or Conv LoRA pair"
        )
    err = lora_rank_error(down.shape, up.shape)
    if err:  # before the scale: rank 0 would divide by zero
        raise AdapterError(f"{source}: module {module!r}: {err}; the adapter file is broken")
    rank = down.shape[0]
    scale = 1.0
    if "alpha" in slots:
        alpha = TensorRef(checkpoint, slots["alpha"]).load()
        if alpha.size != 1:
            raise AdapterError(f"{source}: {slots['alpha']!r} must hold one number, it has shape {tuple(alpha.shape)}")
        what = f"{source}: {slots['alpha']!r}"
        value = float(alpha.reshape(()))
        scale = finite_number(value, what, "the file is broken; re-export the adapter", AdapterError) / rank
    layout = "linear"
    if len(down.shape) == 4:
        base_shape = shape_of(f"{target}.weight") if shape_of else None
        # A 1x1 conv LoRA trained for a Linear layer (SD2 proj_in/proj_out) folds into the 2-D weight as is.
        one_by_one = all(d == 1 for d in down.shape[2:]) and all(d == 1 for d in up.shape[2:])
        layout = "linear" if (one_by_one and base_shape is not None and len(base_shape) == 2) else "conv"
    return LoraDelta(down, up, scale, layout, adapter=label, source_key=slots["up"])
