"""PEFT LoKr: W += alpha/r * kron(w1, w2), reshaped to W's shape, as PEFT merges it.

w1 is stored whole (``lokr_w1``) or as ``lokr_w1_a @ lokr_w1_b`` (``decompose_both``); w2 whole (``lokr_w2``), as
``lokr_w2_a @ lokr_w2_b``, or with ``lokr_t2`` (use_effective_conv2d) as the Tucker product of the core with
w2_a (r, b) and w2_b (r, d). PEFT wraps Linear, Conv1d and Conv2d layers; the math is in :mod:`.lycoris_math`.
"""

from __future__ import annotations

from ..edits import TargetedEdit, TensorRef
from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME, _flag
from .lycoris_config import lycoris_settings, rank_error
from .lycoris_math import Factor, KroneckerDelta
from .registry import Tuner, TunerInput, register_tuner

LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def read_lokr(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every LoKr module's update, and module -> rank (the config's: a factor stored whole has none)."""
    source, raw = tuner_input.source, tuner_input.config.raw
    settings = lycoris_settings(raw, source)
    decompose_both = _flag(raw, "decompose_both", source)
    _flag(raw, "rank_dropout_scale", source)  # training only (rank dropout), but a non-boolean is a broken config
    edits: list[TargetedEdit] = []
    ranks: dict[str, int] = {}
    for module, slots in tuner_input.modules.items():
        unknown = sorted(set(slots) - set(LOKR_PARAMS))
        if unknown:
            raise AdapterError(f"{source}: module {module!r} has {slots[unknown[0]]!r}, which is no LoKr tensor")
        rank = settings.rank(module)
        first = _factor(module, slots, tuner_input, 1)
        second = _factor(module, slots, tuner_input, 2)
        for i, factor in ((1, first), (2, second)):
            err = factor.error()
            if err:
                raise AdapterError(f"{source}: module {module!r}: {err}; the adapter file is broken")
            if factor.rank is not None and factor.rank != rank:
                raise rank_error(module, f"lokr_w{i}_a", factor.rank, rank, source)
        _check_whole(module, first, second, rank, decompose_both, source)
        if len(first.shape) != 2:
            raise AdapterError(f"{source}: module {module!r}: w1 has shape {first.shape}, not a matrix")
        key = slots.get("lokr_w1") or slots["lokr_w1_a"]
        edit = kronecker(first, second, settings.scale(module), rank, tuner_input.label, key)
        edits.append(TargetedEdit(f"{module}.weight", edit))
        ranks[module] = rank
    return edits, ranks


def kronecker(first: Factor, second: Factor, scale: float, rank: int, adapter: str, source_key: str) -> KroneckerDelta:
    """The update ``scale * kron(first, second)`` (PEFT's LoKr files and LyCORIS' alike)."""
    return KroneckerDelta(
        whole1=first.whole,
        up1=first.up,
        down1=first.down,
        whole2=second.whole,
        up2=second.up,
        down2=second.down,
        core2=second.core,
        scale=scale,
        rank=rank,
        adapter=adapter,
        source_key=source_key,
    )


def _factor(module: str, slots: dict[str, str], tuner_input: TunerInput, i: int) -> Factor:
    """Kronecker factor ``i`` from whichever of its forms the module saved (exactly one)."""
    checkpoint, source = tuner_input.checkpoint, tuner_input.source
    whole, up, down = slots.get(f"lokr_w{i}"), slots.get(f"lokr_w{i}_a"), slots.get(f"lokr_w{i}_b")
    core = slots.get("lokr_t2") if i == 2 else None
    if whole is not None and (up or down or core):
        raise AdapterError(
            f"{source}: module {module!r} saves lokr_w{i} both whole and in parts; keep one (the adapter file is "
            "broken)"
        )
    if whole is not None:
        return Factor(whole=TensorRef(checkpoint, whole))
    if up is None or down is None:
        missing = f"lokr_w{i}_a" if up is None else f"lokr_w{i}_b"
        raise AdapterError(
            f"{source}: module {module!r} has neither lokr_w{i} nor {missing}; the adapter file is incomplete"
        )
    return Factor(
        up=TensorRef(checkpoint, up),
        down=TensorRef(checkpoint, down),
        core=None if core is None else TensorRef(checkpoint, core),
    )


def _check_whole(module: str, first: Factor, second: Factor, rank: int, decompose_both: bool, source: str) -> None:
    """A factor saved whole carries no rank, so its scale alpha/r rests on the config's r alone: PEFT saves w1
    whole unless ``decompose_both`` and r < max(a, c)/2, and w2 whole when r >= max(b, d)/2; a config that says
    otherwise is not the one the adapter was trained with."""
    whole = [("lokr_w1", first)] if first.whole is not None and decompose_both else []
    whole += [("lokr_w2", second)] if second.whole is not None else []
    for name, factor in whole:
        sides = factor.shape[:2]
        if rank < max(sides) / 2:
            raise AdapterError(
                f"{source}: module {module!r}: PEFT saves {name} {tuple(sides)} whole only when r >= "
                f"{max(sides) / 2:g}, but {CONFIG_NAME} gives r={rank} (r / rank_pattern, decompose_both): fix the "
                "config to the one the adapter was trained with"
            )


TUNER = register_tuner(
    Tuner(
        "LOKR",
        LOKR_PARAMS,
        read_lokr,
        description="LoKr (W += alpha/r * kron(w1, w2))",
        extra={"layers": ("linear", "conv1d", "conv2d")},  # PEFT's Lokr layers (no GPT-2 Conv1D)
    )
)
