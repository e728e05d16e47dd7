"""PEFT tuner types merged by PEFT's own layer merge, module by module (peft_layer.py; needs ``lorafuse[peft]``).

Each entry: the parameter names its layers save per module (the first part of each saved name after the module:
``glora_A`` for ``glora_A.Xd``), model-level tensors, the layer kinds PEFT's tuner takes (docs/tuners.md) and
whether its merge changes the layer's bias too. Each kind listed is checked against PEFT's
``merge_and_unload()`` in tests/test_tuners_peft_layer.py.
"""

from __future__ import annotations

from ..edits import TargetedEdit
from ..errors import AdapterError
from .peft_layer import read_through_peft
from .registry import Tuner, TunerInput, register_tuner

LINEAR = ("linear",)
LINEAR_CONV1D = ("linear", "gpt2_conv1d")


# peft_type -> (params, shared, layers, merge changes the bias, description)
THROUGH_PEFT: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], bool, str]] = {
    "C3A": (("c3a_kernel",), (), LINEAR, False, "circular convolution kernels"),
    "WAVEFT": (("waveft_spectrum",), (), LINEAR_CONV1D, False, "wavelet-domain sparse update"),
    "ROAD": (("road_theta", "road_alpha"), (), LINEAR, True, "2x2 rotations of output pairs (weight and bias)"),
    "VBLORA": (
        (
            "vblora_logits_A",
            "vblora_logits_B",
            "vblora_logits_A_topk_indices",
            "vblora_logits_A_topk_weights",
            "vblora_logits_B_topk_indices",
            "vblora_logits_B_topk_weights",
        ),
        ("vblora_vector_bank",),
        LINEAR_CONV1D,
        False,
        "LoRA factors mixed from a shared vector bank",
    ),
    "RANDLORA": (
        ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
        ("randlora_A", "randlora_B"),
        LINEAR_CONV1D,
        False,
        "scaled shared random bases (saved with the adapter)",
    ),
    "OSF": (
        ("osf_svd_params",),
        (),
        LINEAR,
        False,
        "orthogonal subspace fine-tuning (low singular directions)",
    ),
    "GRALORA": (
        ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general"),
        (),
        LINEAR_CONV1D,
        False,
        "granular block LoRA",
    ),
    "PEANUT": (
        ("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders"),
        (),
        LINEAR,
        False,
        "weight-aware neural tweakers",
    ),
    "DELORA": (
        ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
        (),
        LINEAR,
        False,
        "decoupled LoRA (normalised, bounded)",
    ),
    "PSOFT": (
        ("psoft_R",),
        (),
        LINEAR,
        False,
        "orthogonal rotation in the principal subspace",
    ),
    "SUPERTUNING": (
        ("supertuning_values", "supertuning_indices", "supertuning_lora_A", "supertuning_lora_B"),
        (),
        LINEAR,
        False,
        "sparse trained entries (+ optional LoRA)",
    ),
    "DEFT": (
        ("deft_P", "deft_R"),
        (),
        LINEAR_CONV1D,
        False,
        "residual-projection update (decompositional fine-tuning)",
    ),
    "FROD": (
        ("frod_lambda_l", "frod_lambda_s_values"),
        ("frod_V", "frod_s_indices", "frod_s_size"),
        LINEAR_CONV1D,
        False,
        "joint decomposition of the base weights (projections saved with the adapter)",
    ),
    "GLORA": (tuple(f"glora_{path}" for path in "ABCDE"), (), LINEAR, True, "generalised LoRA (weight and bias)"),
    "HIRA": (
        ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"),
        (),
        ("linear", "conv1d", "conv2d", "conv3d", "embedding", "gpt2_conv1d"),
        False,
        "Hadamard high-rank update (W * BA)",
    ),
    "ADAMSS": (
        ("adamss_A", "adamss_B", "adamss_newB"),
        (),
        LINEAR,
        True,
        "adaptive multi-subspaces (needs scikit-learn)",
    ),
    "UNILORA": (
        ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
        ("unilora_theta_d",),
        LINEAR_CONV1D,
        False,
        "LoRA factors drawn from one shared vector (indices saved with save_indices)",
    ),
    "TINYLORA": (
        ("tinylora_A", "tinylora_B", "tinylora_P"),
        ("tinylora_v",),
        LINEAR_CONV1D,
        False,
        "one trained vector through saved projections (a single shared vector: weight_tying=1 or one module)",
    ),
}


def _read_tinylora(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """TinyLoRA: PEFT gives each layer the shared vector of its group, by the layer's place among all targeted
    layers of the model; lorafuse merges one module at a time, which settles the group only when there is one."""
    vectors = sorted(tuner_input.shared)
    if len(vectors) != 1:
        raise AdapterError(
            f"{tuner_input.source}: this TINYLORA adapter shares {len(vectors)} vectors among its layers by their "
            "place in the whole model, which lorafuse cannot tell (it merges one module at a time): merge it with "
            "PEFT's merge_and_unload(), or train with weight_tying=1.0"
        )
    unsaved = [m for m, slots in tuner_input.modules.items() if "tinylora_P" not in slots]
    if unsaved:
        raise AdapterError(
            f"{tuner_input.source}: TINYLORA module {unsaved[0]!r} has no saved projection (save_projection=false): "
            "PEFT seeds it from the layer's place in the whole model, which lorafuse cannot tell; retrain with "
            "save_projection=True or merge with PEFT's merge_and_unload()"
        )
    return read_through_peft(tuner_input)


def _read_unilora(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """UniLoRA: without ``save_indices`` PEFT draws each layer's indices from torch's global generator when it
    loads the adapter, so no merge (PEFT's included) reproduces the trained model."""
    if not tuner_input.config.raw.get("save_indices", False):
        raise AdapterError(
            f"{tuner_input.source}: this UNILORA adapter was saved without its indices (save_indices=false); PEFT "
            "draws new random ones when it loads it, so the trained update is lost: retrain with save_indices=True"
        )
    return read_through_peft(tuner_input)


def _register(peft_type: str) -> Tuner:
    params, shared, layers, bias, description = THROUGH_PEFT[peft_type]
    extra = {"layers": layers, "bias": bias}
    reader = {"UNILORA": _read_unilora, "TINYLORA": _read_tinylora}.get(peft_type, read_through_peft)
    return register_tuner(
        Tuner(peft_type, params, reader, how="peft", shared=shared, description=description, extra=extra)
    )


TUNERS = [_register(peft_type) for peft_type in THROUGH_PEFT]
