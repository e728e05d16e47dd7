"""PEFT BEFT (bias tuning): bias += beft_bias, PEFT's merge of a Linear layer's bias (refused without one)."""

from __future__ import annotations

from ..edits import FullDiff, TargetedEdit, TensorRef
from ..errors import AdapterError
from .registry import Tuner, TunerInput, register_tuner


def read_beft(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Each module's bias update (saved as (1, out): its values in order are the bias's)."""
    edits: list[TargetedEdit] = []
    for module, slots in tuner_input.modules.items():
        key = slots.get("beft_bias")
        if key is None or len(slots) != 1:
            raise AdapterError(f"{tuner_input.source}: module {module!r} holds {sorted(slots)}, not one beft_bias")
        edit = FullDiff(TensorRef(tuner_input.checkpoint, key), adapter=tuner_input.label, source_key=key)
        edits.append(TargetedEdit(f"{module}.bias", edit))
    return edits, {module: 0 for module in tuner_input.modules}


TUNER = register_tuner(
    Tuner("BEFT", ("beft_bias",), read_beft, description="bias += beft_bias", extra={"layers": ("linear",)})
)
