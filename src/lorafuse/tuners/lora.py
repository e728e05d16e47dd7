"""PEFT LoRA (and DoRA, ``lora_bias``, embeddings, Conv layers): W += alpha/r * B @ A, as PEFT merges it."""

from __future__ import annotations

from ..edits import BiasDelta, DoraDelta, Edit, LoraDelta, TargetedEdit, TensorRef, lora_rank_error
from ..errors import AdapterError
from .registry import Tuner, TunerInput, register_tuner

LORA_PARAMS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def read_lora(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every LoRA module's edits, and module -> rank."""
    edits: list[TargetedEdit] = []
    modules: dict[str, int] = {}
    for module, slots in tuner_input.modules.items():
        module_edits = module_edits_of(module, slots, tuner_input)
        modules[module] = module_edits[0].edit.rank  # type: ignore[attr-defined]
        edits.extend(module_edits)
    return edits, modules


def module_edits_of(module: str, slots: dict[str, str], tuner_input: TunerInput) -> list[TargetedEdit]:
    """The edits of one LoRA module: its weight's update (LoRA or DoRA) and, with ``lora_bias``, its bias's."""
    checkpoint, config = tuner_input.checkpoint, tuner_input.config
    label, source = tuner_input.label, tuner_input.source
    embedding = "lora_embedding_A" in slots or "lora_embedding_B" in slots
    a_key = slots.get("lora_embedding_A" if embedding else "lora_A")
    b_key = slots.get("lora_embedding_B" if embedding else "lora_B")
    if a_key is None or b_key is None:
        missing = "A" if a_key is None else "B"
        raise AdapterError(f"{source}: module {module!r} has no lora_{missing} tensor; the adapter file is incomplete")
    a_ref, b_ref = TensorRef(checkpoint, a_key), TensorRef(checkpoint, b_key)
    err = lora_rank_error(a_ref.shape, b_ref.shape)
    if err:  # before the scale: rank 0 would divide by zero
        raise AdapterError(f"{source}: module {module!r}: {err}; the adapter file is broken")
    rank = a_ref.shape[0]
    scale = config.scaling(module, rank)
    if embedding:
        layout, output_dim = "transposed", 1
    elif len(a_ref.shape) > 2:
        layout, output_dim = "conv", 0
    elif config.fan_in_fan_out:
        layout, output_dim = "transposed", 1
    else:
        layout, output_dim = "linear", 0
    magnitude_key = slots.get("lora_magnitude_vector") or slots.get("lora_magnitude_vector.bias")
    edit: Edit
    if magnitude_key is not None:
        edit = DoraDelta(
            a_ref,
            b_ref,
            scale,
            layout,
            magnitude=TensorRef(checkpoint, magnitude_key),
            output_dim=output_dim,
            adapter=label,
            source_key=b_key,
        )
    else:
        edit = LoraDelta(a_ref, b_ref, scale, layout, adapter=label, source_key=b_key)
    out = [TargetedEdit(f"{module}.weight", edit)]
    bias_key = slots.get("lora_B.bias") or slots.get("lora_embedding_B.bias")
    if bias_key is not None:
        out.append(
            TargetedEdit(
                f"{module}.bias", BiasDelta(TensorRef(checkpoint, bias_key), scale, adapter=label, source_key=bias_key)
            )
        )
    return out


TUNER = register_tuner(Tuner("LORA", LORA_PARAMS, read_lora, description="LoRA / DoRA (W += alpha/r * B A)"))
