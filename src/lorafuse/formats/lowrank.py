"""Shared reader for single-file LoRA formats that name tensors ``<module>.<slot>`` (kohya, diffusion, plain).

Each format declares which key suffixes it accepts and how a module name in the file maps to a base module; this
module groups the keys by module and turns each group into edits:

- ``up``/``down`` (``lora_up``/``lora_down`` or ``lora_B``/``lora_A``) with optional ``alpha``: W += (alpha / rank)
  * up @ down (scale 1 without alpha), for Linear (2-D) and Conv (1x1 and kxk) weights;
- ``diff``/``diff_b``/``diff_m``: full differences added to ``.weight``/``.bias``/``.modulation``;
- the LyCORIS algorithms where the format accepts their names (LoCon's ``lora_mid``, LoHa, LoKr, ``dora_scale``,
  ``w_norm``/``b_norm``: :mod:`.lycoris`).

An ``alpha`` of 0 is refused: trainers read it as alpha = rank, some loaders as scale 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..edits import Edit, FullDiff, LoraDelta, TargetedEdit, TensorRef, lora_rank_error
from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..peft_flags import finite_number
from . import lycoris

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
# (module, tensor name, rank) -> the module's scale, where the file keeps its alphas outside the tensors
ScaleOf = Callable[[str, str, int], float]


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
    scale_of: ScaleOf | None = None,
) -> LowRankAdapter:
    """Group ``checkpoint``'s keys by module and build edits.

    ``suffixes`` maps a key suffix (``.lora_up.weight``) to its slot (``up``, ``down``, ``alpha``, ``diff``,
    ``diff_b``, ``diff_m``); ``resolve(module, key)`` maps a module name in the file to the target module name
    (identity when None); ``shape_of(target)`` gives the base tensor's shape when known, to lay out conv LoRAs;
    ``scale_of`` gives the scales of a file that keeps its alphas elsewhere (diffusers' metadata).
    """
    source = str(checkpoint.files[0])
    groups: dict[str, dict[str, str]] = {}
    for key in checkpoint.keys():  # a LyCORIS algorithm lorafuse does not merge is named before anything else
        unsupported = lycoris.unsupported_error(key, source)
        if unsupported is not None:
            raise unsupported
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
        for slot, attr in (DIFF_TARGETS | lycoris.NORM_TARGETS).items():
            if slot in slots:
                key = slots[slot]
                diff = FullDiff(TensorRef(checkpoint, key), adapter=label, source_key=key)
                edits.append(TargetedEdit(f"{target}.{attr}", diff))
        update = _update(checkpoint, slots, module, target, label, source, shape_of, scale_of)
        if update is not None:
            modules[target] = update.rank
            if "dora_scale" in slots:
                magnitude = TensorRef(checkpoint, slots["dora_scale"])
                update = lycoris.WeightDecomposed(update, magnitude, adapter=label, source_key=slots["dora_scale"])
            edits.append(TargetedEdit(f"{target}.weight", update))
        elif "alpha" in slots or "dora_scale" in slots:
            key = slots.get("alpha") or slots["dora_scale"]
            raise AdapterError(
                f"{source}: {key!r} has no update (lora_up/lora_down, LoHa, LoKr, GLoRA) beside it; the file is "
                "incomplete"
            )
    return LowRankAdapter(edits, modules)


def _update(
    checkpoint: Checkpoint,
    slots: dict[str, str],
    module: str,
    target: str,
    label: str,
    source: str,
    shape_of: ShapeOf | None,
    scale_of: ScaleOf | None,
) -> Edit | None:
    """The module's weight update (LoRA, LoCon with lora_mid, LoHa, LoKr), or None when it has none."""
    algorithm = lycoris.algorithm_of(slots)
    lora = "up" in slots or "down" in slots or "mid" in slots
    if algorithm and lora:
        names = [key for slot, key in slots.items() if slot in ("up", "down", "mid")][:1] + [
            key for slot, key in slots.items() if slot in lycoris.ALGORITHM_SLOTS[algorithm]
        ][:1]
        raise AdapterError(
            f"{source}: module {module!r} holds both LoRA and {algorithm} tensors ({', '.join(map(repr, names))}); "
            "the file is broken"
        )

    def alpha_scale(rank: int) -> float:
        return _scale(checkpoint, slots, module, source, rank, scale_of)

    if algorithm == "loha":
        return lycoris.loha(checkpoint, slots, alpha_scale, label, source)
    if algorithm == "lokr":
        return lycoris.lokr(checkpoint, slots, alpha_scale, label, source)
    if algorithm == "glora":
        return lycoris.glora(checkpoint, slots, alpha_scale, label, source)
    if algorithm == "oft":  # its alpha is a norm constraint, not alpha / rank
        return lycoris.oft(checkpoint, slots, label, source)
    if lora:
        return _lora_edit(checkpoint, slots, module, target, label, source, shape_of, alpha_scale)
    return None


def _scale(
    checkpoint: Checkpoint, slots: dict[str, str], module: str, source: str, rank: int, scale_of: ScaleOf | None
) -> float:
    """alpha / rank from the module's ``alpha`` tensor or the file's metadata; 1 without either."""
    if "alpha" in slots and scale_of is not None:
        raise AdapterError(
            f"{source}: {slots['alpha']!r} and the file's LoRA config metadata both give module {module!r} an alpha "
            "(diffusers refuses such a file too); re-export the adapter with one of them"
        )
    if scale_of is not None:
        key = next(iter(slots.values()))
        what, fix = f"{source}: the scale of {module!r}", "fix the lora_alpha in the file's metadata"
        return finite_number(scale_of(module, key, rank), what, fix, AdapterError)
    if "alpha" not in slots:
        return 1.0
    alpha = TensorRef(checkpoint, slots["alpha"]).load()
    if alpha.size != 1:
        raise AdapterError(f"{source}: {slots['alpha']!r} must hold one number, it has shape {tuple(alpha.shape)}")
    value = finite_number(
        float(alpha.reshape(())),
        f"{source}: {slots['alpha']!r}",
        "the file is broken; re-export the adapter",
        AdapterError,
    )
    if value == 0:
        # kohya's and LyCORIS' training read alpha 0 as alpha = rank (scale 1), merge scripts and ComfyUI as 0.
        raise AdapterError(
            f"{source}: {slots['alpha']!r} is 0, which trainers read as alpha = rank (scale 1) and some loaders as "
            "scale 0: set it to the alpha the LoRA was trained with"
        )
    return value / rank


def _lora_edit(
    checkpoint: Checkpoint,
    slots: dict[str, str],
    module: str,
    target: str,
    label: str,
    source: str,
    shape_of: ShapeOf | None,
    alpha_scale: Callable[[int], float],
) -> LoraDelta:
    if "up" not in slots or "down" not in slots:
        missing = "up (lora_up / lora_B)" if "up" not in slots else "down (lora_down / lora_A)"
        raise AdapterError(f"{source}: module {module!r} has no {missing} tensor; the adapter file is incomplete")
    if "mid" in slots:
        rank = TensorRef(checkpoint, slots["down"]).shape[0]
        return lycoris.tucker_locon(checkpoint, slots, alpha_scale(rank), label, source, module)
    down, up = TensorRef(checkpoint, slots["down"]), TensorRef(checkpoint, slots["up"])
    if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape):
        raise AdapterError(
            f"{source}: {slots['down']!r} {down.shape} and {slots['up']!r} {up.shape} "
            "are not a Linear or Conv LoRA pair"
        )
    err = lora_rank_error(down.shape, up.shape)
    if err:  # before the scale: rank 0 would divide by zero
        raise AdapterError(f"{source}: module {module!r}: {err}; the adapter file is broken")
    scale = alpha_scale(down.shape[0])
    layout = "linear"
    if len(down.shape) == 4:
        base_shape = shape_of(f"{target}.weight") if shape_of else None
        # A 1x1 conv LoRA trained for a Linear layer (SD2 proj_in/proj_out) folds into the 2-D weight as is.
        one_by_one = all(d == 1 for d in down.shape[2:]) and all(d == 1 for d in up.shape[2:])
        layout = "linear" if (one_by_one and base_shape is not None and len(base_shape) == 2) else "conv"
    return LoraDelta(down, up, scale, layout, adapter=label, source_key=slots["up"])
