"""PEFT LN tuning: a trained copy of each targeted module (layer norms) replaces it; PEFT's merge swaps the copy
in, so every saved parameter of the copy replaces the base's (``X.ln_tuning_layers.weight`` -> ``X.weight``)."""

from __future__ import annotations

from ..edits import Replace, TargetedEdit, TensorRef
from ..errors import AdapterError
from .registry import Tuner, TunerInput, register_tuner

PARAM = "ln_tuning_layers"


def read_ln_tuning(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """The saved copy's weight and bias, each replacing the base module's."""
    edits: list[TargetedEdit] = []
    for module, slots in tuner_input.modules.items():
        for slot, key in slots.items():
            name = {PARAM: "weight", f"{PARAM}.bias": "bias"}[slot]
            if not key.endswith(f".{PARAM}.{name}"):
                raise AdapterError(
                    f"{tuner_input.source}: {key!r} is not the weight or bias of a tuned layer norm; lorafuse merges "
                    "LN tuning of modules whose parameters are a weight and a bias"
                )
            edit = Replace(TensorRef(tuner_input.checkpoint, key), adapter=tuner_input.label, source_key=key)
            edits.append(TargetedEdit(f"{module}.{name}", edit))
    return edits, {module: 0 for module in tuner_input.modules}


TUNER = register_tuner(
    Tuner(
        "LN_TUNING",
        (PARAM,),
        read_ln_tuning,
        description="trained layer-norm copies replace the base's",
        extra={"layers": ("any",)},
    )
)
