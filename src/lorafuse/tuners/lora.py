"""PEFT LoRA (and DoRA, ``lora_bias``, embeddings, Conv layers, the variants of lora_variants.py): W += alpha/r *
B @ A, as PEFT merges it."""

from __future__ import annotations

from dataclasses import replace

from ..edits import BiasDelta, DoraDelta, Edit, LoraDelta, TargetedEdit, TensorRef, lora_rank_error
from ..errors import AdapterError
from .lora_parameters import is_parameter_group, read_parameter_loras, target_parameters
from .lora_variants import KASA_DIAG, VARIANT_PARAMS, KasaDelta, bdlora_refs, check_variant_slots, variant_of
from .registry import Tuner, TunerInput, register_tuner

LORA_PARAMS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", *VARIANT_PARAMS)


def read_lora(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every LoRA module's edits, and module -> rank (``target_parameters`` LoRAs: lora_parameters.py)."""
    edits: list[TargetedEdit] = []
    modules: dict[str, int] = {}
    targets = target_parameters(tuner_input.config, tuner_input.source)
    on_parameters: dict[str, dict[str, str]] = {}
    attention = {m for m in tuner_input.modules if m + MHA_OUT_PROJ in tuner_input.modules}
    for module, slots in tuner_input.modules.items():
        if module.removesuffix(MHA_OUT_PROJ) in attention and module not in attention:
            continue  # read with its attention module
        if module in attention:
            module_edits = multihead_attention_edits(module, tuner_input)
            modules[module] = module_edits[0].edit.rank  # type: ignore[attr-defined]
            edits.extend(module_edits)
            continue
        if is_parameter_group(module, targets, tuner_input.shape_of):
            on_parameters[module] = slots
            continue
        module_edits = module_edits_of(module, slots, tuner_input)
        modules[module] = module_edits[0].edit.rank  # type: ignore[attr-defined]
        edits.extend(module_edits)
    if on_parameters:
        parameter_edits, ranks = read_parameter_loras(tuner_input, on_parameters, targets)
        edits.extend(parameter_edits)
        modules.update(ranks)
    return edits, modules


# PEFT's lora.MultiheadAttention saves the in_proj LoRA under the attention module and its out_proj's (a lora.Linear
# inside it) under this suffix.
MHA_OUT_PROJ = ".base_layer.out_proj"


def multihead_attention_edits(module: str, tuner_input: TunerInput) -> list[TargetedEdit]:
    """LoRA on ``nn.MultiheadAttention`` as PEFT merges it (and as its forward, which merges for every call, ran in
    training): ``in_proj_weight += s * B @ A``; ``out_proj.weight += 2 * s * B_o @ A_o``, since PEFT adds the
    out_proj update itself and then merges the out_proj lora.Linear, which adds it again; ``out_proj.bias`` gets
    its ``lora_bias`` once. The in_proj's lora_B.bias is never used by PEFT and is dropped. The rank and alpha
    patterns are matched on the attention module for both, as PEFT builds both LoRAs with its values.
    """
    in_proj = module_edits_of(module, tuner_input.modules[module], tuner_input)
    out_proj = module_edits_of(module, tuner_input.modules[module + MHA_OUT_PROJ], tuner_input)
    if any(type(t.edit) is not LoraDelta for t in (in_proj[0], out_proj[0])):  # not DoRA or a variant
        raise AdapterError(f"{tuner_input.source}: {module!r}: PEFT merges plain LoRA only on nn.MultiheadAttention")
    edits = [
        replace(in_proj[0], target=f"{module}.in_proj_weight", edit=replace(in_proj[0].edit, by_layer=False)),
        replace(
            out_proj[0], target=f"{module}.out_proj.weight", edit=replace(out_proj[0].edit, by_layer=False).scaled(2.0)
        ),
    ]
    edits.extend(replace(t, target=f"{module}.out_proj.bias") for t in out_proj[1:])
    return edits


def conv_groups(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """The ``groups`` of a conv LoRA's factors (1 for an ungrouped one or a Linear one): PEFT builds lora_A and
    lora_B with the base conv's groups, so lora_A (r, in/g, *k) and lora_B (out, r/g, *1) differ by g in rank."""
    if len(a_shape) <= 2 or len(b_shape) != len(a_shape) or not b_shape[1] or a_shape[0] == b_shape[1]:
        return 1
    return a_shape[0] // b_shape[1] if a_shape[0] % b_shape[1] == 0 else 1


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
    variant = variant_of(config, source)
    check_variant_slots(variant, module, slots, not embedding and len(a_ref.shape) == 2, source)
    if variant == "use_bdlora":
        a_ref, b_ref = bdlora_refs(config.raw, module, a_ref, b_ref, source)
    groups = conv_groups(a_ref.shape, b_ref.shape)
    if groups > 1:
        raise AdapterError(
            f"{source}: module {module!r}: grouped conv LoRA cannot be merged (PEFT cannot either): lora_A "
            f"{a_ref.shape} and lora_B {b_ref.shape} are the factors of a conv layer with groups={groups}"
        )
    err = lora_rank_error(a_ref.shape, b_ref.shape)
    if err:  # before the scale: rank 0 would divide by zero
        raise AdapterError(f"{source}: module {module!r}: {err}; the adapter file is broken")
    rank = a_ref.shape[0]
    scale = config.scaling(module, rank)
    if embedding:
        layout, output_dim = "transposed", 1
    elif len(a_ref.shape) > 2:
        layout, output_dim = "conv", 0
    elif config.fan_in_fan_out:  # a hint only: the plan orients each 2-D LoRA by its layer (LoraDelta.oriented)
        layout, output_dim = "transposed", 1
    else:
        layout, output_dim = "linear", 0
    by_layer = layout != "conv" and not embedding
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
            by_layer=by_layer,
            adapter=label,
            source_key=b_key,
        )
    elif variant == "kasa_config":
        if KASA_DIAG not in slots:
            raise AdapterError(f"{source}: KaSA module {module!r} has no lora_diag tensor; the adapter is incomplete")
        diag = TensorRef(checkpoint, slots[KASA_DIAG])
        edit = KasaDelta(a_ref, b_ref, scale, layout, by_layer, diag=diag, adapter=label, source_key=b_key)
    else:
        edit = LoraDelta(a_ref, b_ref, scale, layout, by_layer, adapter=label, source_key=b_key)
    out = [TargetedEdit(f"{module}.weight", edit)]
    bias_key = slots.get("lora_B.bias") or slots.get("lora_embedding_B.bias")
    if bias_key is not None:
        out.append(
            TargetedEdit(
                f"{module}.bias", BiasDelta(TensorRef(checkpoint, bias_key), scale, adapter=label, source_key=bias_key)
            )
        )
    return out


TUNER = register_tuner(
    Tuner(
        "LORA",
        LORA_PARAMS,
        read_lora,
        description="LoRA / DoRA (W += alpha/r * B A); KaSA, BD-LoRA, VeLoRA, MonteCLoRA; nn.MultiheadAttention; "
        "target_parameters (MoE experts)",
        extra={"layers": ("linear", "conv1d", "conv2d", "conv3d", "embedding", "gpt2_conv1d", "parameter")},
    )
)
