"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``) read into edits.

Reproduces the semantics of PEFT's ``merge_and_unload()`` for LoRA: scaling alpha/r or alpha/sqrt(r) (rsLoRA),
``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out``, embeddings, Conv layers, DoRA, ``lora_bias``,
``modules_to_save`` and trained biases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..edits import Replace, RowReplace, TargetedEdit, TensorRef
from ..errors import AdapterError, InputError
from ..io.checkpoint import Checkpoint
from ..io.model_files import real_path

# The config is read and checked by the one reader of adapter configs.
from ..peft_flags import CONFIG_NAME, AdapterConfig, load_config
from ..plan import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING, AdapterInput
from ..tuners import TunerInput, group_tensors, tuner_of
from .peft_writer import write_peft_adapter
from .registry import AdapterFormat, ReadContext, StoredNames, register_format
from .single import PEFT_PREFIX, adapter_keys

ShapeOf = Callable[[str], "tuple[int, ...] | None"]
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")

# Parameter-name stems of PEFT tuners: a tensor holding one that its tuner did not claim is refused, not taken for
# a saved module (a LoRA tensor in an IA3 adapter, a parameter lorafuse does not know).
TUNER_MARKS = ("lora_", "hada_", "lokr_", "ia3_", "oft_", "boft_", "vera_", "fourierft_", "hra_", "vblora_")
# PEFT trainable tokens (trainable_token_indices): the trained rows of an embedding, replacing the base's rows.
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


def find_adapter_weights(folder: Path) -> Path:
    """The weight file of a PEFT adapter folder."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
        if os.path.lexists(folder / name):
            real_path(folder / name, folder)  # a broken link or a symlink loop: an error naming it
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
    raise InputError(
        f"{folder} has no adapter weights (adapter_model.safetensors, adapter_model.bin or pytorch_model.bin); "
        f"it holds: {listing}"
    )


@dataclass
class PeftAdapter:
    """A PEFT adapter read into edits."""

    path: Path
    config: AdapterConfig
    checkpoint: Checkpoint
    edits: list[TargetedEdit]
    modules: dict[str, int]  # LoRA module name -> rank


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def read_peft_adapter(
    folder: Path,
    label: str | None = None,
    config: AdapterConfig | None = None,
    weights: Path | None = None,
    shape_of: ShapeOf | None = None,
) -> PeftAdapter:
    """Read a PEFT adapter folder into targeted edits (targets named as in the trained model's state dict).

    ``shape_of`` gives base tensor shapes by name, where the base is known (see :class:`TunerInput`)."""
    folder = Path(folder)
    if config is None:
        config = load_config(folder / CONFIG_NAME)
    weights = weights or find_adapter_weights(folder)
    checkpoint = Checkpoint([weights])
    label = label or str(folder)
    edits = edits_from_state(checkpoint, config, label, str(weights), shape_of)
    return PeftAdapter(folder, config, checkpoint, *edits)


def edits_from_state(
    checkpoint: Checkpoint, config: AdapterConfig, label: str, source: str, shape_of: ShapeOf | None = None
) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Group a PEFT state dict by module with the config's tuner type (tuners/) and turn it into edits.

    Tensors no tuner parameter names are PEFT's saved modules: trainable tokens (rows of an embedding),
    ``modules_to_save``, trained biases and saved base layers (replacing the base tensor).
    """
    tuner = tuner_of(config.peft_type)
    assert tuner is not None, "parse_config refuses tuner types nobody registered"
    names = [(strip_peft_prefix(key), key) for key in checkpoint.keys()]
    modules, shared, rest = group_tensors(names, tuner, source)
    edits: list[TargetedEdit] = []
    for key in rest:
        name = strip_peft_prefix(key)
        if name.endswith(TOKEN_DELTA):
            module = name[: -len(TOKEN_DELTA)]
            indices = config.token_indices(module, source)
            edits.append(
                TargetedEdit(
                    f"{module}.weight",
                    RowReplace(TensorRef(checkpoint, key), indices, adapter=label, source_key=key),
                )
            )
            continue
        if any(p in name for p in TUNER_MARKS) or "trainable_tokens" in name:
            raise AdapterError(f"{source}: tensor {key!r} is not a {tuner.peft_type} tensor lorafuse understands")
        if ".original_module." in name:
            # bias="all" also saves the untrained copy a modules_to_save wrapper keeps; PEFT's merge drops it.
            continue
        # modules_to_save, trained biases and saved base layers: the stored tensor replaces the base one.
        target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        saved = Replace(TensorRef(checkpoint, key), base_copy=".base_layer." in name, adapter=label, source_key=key)
        edits.append(TargetedEdit(target, saved))
    tuner_edits, sizes = tuner.read(TunerInput(checkpoint, config, modules, label, source, shared, shape_of))
    edits.extend(tuner_edits)
    return edits, sizes


def sniff(path: Path) -> bool:
    """A PEFT adapter folder (``adapter_config.json`` inside), or its ``adapter_model*`` weight file (the config
    beside it). PEFT tensors without the config are refused: their scaling is in the config."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return True
    if path.is_file() and (path.parent / CONFIG_NAME).is_file() and path.name.startswith("adapter_model"):
        return True
    if path.exists() and any(k.startswith(PEFT_PREFIX) for k in adapter_keys(path)):
        raise AdapterError(
            f"{path} holds PEFT tensors (base_model.model.*) but no {CONFIG_NAME} beside it: "
            "put the adapter's adapter_config.json next to the weights and pass the folder"
        )
    return False


def _tokens_only(edits: list[TargetedEdit]) -> bool:
    """True when trainable tokens are the adapter's only change to embeddings and heads: PEFT ties their rows to
    a tied output head (the same rows moved together in training), so the pair stays tied."""
    vocab = [e for e in edits if e.target.endswith((*EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING))]
    return bool(vocab) and all(isinstance(e.edit, RowReplace) for e in vocab)


def read(path: Path, context: ReadContext) -> AdapterInput:
    """Read a PEFT adapter folder, or one of its weight files (its adapter_config.json sits beside it)."""
    path = Path(path)
    folder, weights = (path.parent, path) if path.is_file() else (path, None)
    shape_of = context.shape_of if context.base_shapes is not None else None
    adapter = read_peft_adapter(folder, context.label, weights=weights, shape_of=shape_of)
    return AdapterInput(
        label=context.label,
        edits=adapter.edits,
        weight=context.weight,
        target_modules=adapter.config.target_modules,
        modules=adapter.modules,
        keep_tied=bool(adapter.config.raw.get("ensure_weight_tying", False)) or _tokens_only(adapter.edits),
        files=[adapter.checkpoint.files[0]],
        fmt="peft",
    )


def lora_names(module: str) -> tuple[str, str, str | None]:
    """The (lora_B, lora_A) names PEFT saves for ``module``; the scale is in the config."""
    return f"{PEFT_PREFIX}{module}.lora_B.weight", f"{PEFT_PREFIX}{module}.lora_A.weight", None


def diff_name(name: str) -> str | None:
    """None: a PEFT adapter holds differences only as ``modules_to_save`` or ``lora_bias``, decided per module."""
    del name
    return None


FORMAT = register_format(
    AdapterFormat(
        "peft",
        sniff=sniff,
        read=read,
        write=write_peft_adapter,
        names=StoredNames("peft", lora_names, diff_name),
        priority=0,  # first: its config beside PEFT names decides, whatever the key names look like
    )
)
