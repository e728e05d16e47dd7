"""PEFT trainable tokens as a tuner of their own (``peft_type`` TRAINABLE_TOKENS): the saved rows of each
targeted embedding replace the base's rows at ``token_indices`` (PEFT's merge: ``index_copy``)."""

from __future__ import annotations

from ..edits import RowReplace, TargetedEdit, TensorRef
from ..errors import AdapterError
from .registry import Tuner, TunerInput, register_tuner


def _token_indices(tuner_input: TunerInput) -> tuple[int, ...]:
    indices = tuner_input.config.raw.get("token_indices")
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise AdapterError(
            f"{tuner_input.source}: token_indices is {indices!r}, not a list of token ids: fix adapter_config.json"
        )
    return tuple(indices)


def read_trainable_tokens(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Each targeted embedding's trained rows, and module -> number of tokens."""
    indices = _token_indices(tuner_input)
    edits: list[TargetedEdit] = []
    for module, slots in tuner_input.modules.items():
        key = slots.get("trainable_tokens_delta")
        if key is None or len(slots) != 1:
            raise AdapterError(f"{tuner_input.source}: module {module!r} holds {sorted(slots)}, not trained token rows")
        edit = RowReplace(TensorRef(tuner_input.checkpoint, key), indices, adapter=tuner_input.label, source_key=key)
        edits.append(TargetedEdit(f"{module}.weight", edit))
    return edits, {module: len(indices) for module in tuner_input.modules}


TUNER = register_tuner(
    Tuner(
        "TRAINABLE_TOKENS",
        ("trainable_tokens_delta",),
        read_trainable_tokens,
        description="the trained rows of an embedding replace the base's rows",
        extra={"layers": ("embedding",)},
    )
)
