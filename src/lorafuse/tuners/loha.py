"""PEFT LoHa: W += alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b), or with ``hada_t1``/``hada_t2`` (use_effective_conv2d)
each factor a Tucker product of its core with w*_a (r, out) and w*_b (r, in), as PEFT merges it.

PEFT wraps Linear, Conv1d and Conv2d layers with LoHa; the math is in :mod:`.lycoris_math`.
"""

from __future__ import annotations

from ..edits import TargetedEdit, TensorRef
from ..errors import AdapterError
from .lycoris_config import lycoris_settings, rank_error
from .lycoris_math import Factor, HadamardDelta
from .registry import Tuner, TunerInput, register_tuner

LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def read_loha(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every LoHa module's update, and module -> rank."""
    source = tuner_input.source
    settings = lycoris_settings(tuner_input.config.raw, source)
    edits: list[TargetedEdit] = []
    ranks: dict[str, int] = {}
    for module, slots in tuner_input.modules.items():
        unknown = sorted(set(slots) - set(LOHA_PARAMS))
        if unknown:
            raise AdapterError(f"{source}: module {module!r} has {slots[unknown[0]]!r}, which is no LoHa tensor")
        factors = [_factor(module, slots, tuner_input, i) for i in (1, 2)]
        rank = settings.rank(module)
        for i, factor in enumerate(factors, start=1):
            err = factor.error()
            if err:
                raise AdapterError(f"{source}: module {module!r}: {err}; the adapter file is broken")
            if factor.rank != rank:
                raise rank_error(module, f"hada_w{i}_a", factor.rank or 0, rank, source)
        first, second = factors
        edit = HadamardDelta(
            first.up,
            first.down,
            second.up,
            second.down,
            core1=first.core,
            core2=second.core,
            scale=settings.scale(module),
            rank=rank,
            adapter=tuner_input.label,
            source_key=slots["hada_w1_a"],
        )
        edits.append(TargetedEdit(f"{module}.weight", edit))
        ranks[module] = rank
    return edits, ranks


def _factor(module: str, slots: dict[str, str], tuner_input: TunerInput, i: int) -> Factor:
    """Hadamard factor ``i``: ``hada_w{i}_a`` (out, r) @ ``hada_w{i}_b`` (r, in*kernel), or with ``hada_t{i}``
    the Tucker product of the core (r, r, *kernel) with w_a (r, out) and w_b (r, in)."""
    names = (f"hada_w{i}_a", f"hada_w{i}_b")
    missing = [n for n in names if n not in slots]
    if missing:
        raise AdapterError(
            f"{tuner_input.source}: module {module!r} has no {missing[0]} tensor; the adapter file is incomplete"
        )
    checkpoint = tuner_input.checkpoint
    up, down = (TensorRef(checkpoint, slots[n]) for n in names)
    core = slots.get(f"hada_t{i}")
    if (core is None) != (f"hada_t{3 - i}" not in slots):
        raise AdapterError(
            f"{tuner_input.source}: module {module!r} has one Tucker core (hada_t1/hada_t2) without the other; "
            "the adapter file is incomplete"
        )
    return Factor(up=up, down=down, core=None if core is None else TensorRef(checkpoint, core))


TUNER = register_tuner(
    Tuner(
        "LOHA",
        LOHA_PARAMS,
        read_loha,
        description="LoHa (W += alpha/r * (w1a w1b) * (w2a w2b))",
        extra={"layers": ("linear", "conv1d", "conv2d")},  # PEFT's Loha layers (no GPT-2 Conv1D)
    )
)
