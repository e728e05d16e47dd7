"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``) read into edits.

Reproduces the semantics of PEFT's ``merge_and_unload()`` for LoRA: scaling alpha/r or alpha/sqrt(r) (rsLoRA),
``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out``, embeddings, Conv layers, DoRA, ``lora_bias``,
``modules_to_save`` and trained biases.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..edits import BiasDelta, DoraDelta, Edit, LoraDelta, Replace, RowReplace, TargetedEdit, TensorRef, lora_rank_error
from ..errors import AdapterError, InputError
from ..io.checkpoint import Checkpoint
from ..io.model_files import real_path

# The config is read and checked by the one reader of adapter configs.
from ..peft_flags import CONFIG_NAME, AdapterConfig, load_config
from ..plan import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING, AdapterInput
from .peft_writer import write_peft_adapter
from .registry import AdapterFormat, ReadContext, StoredNames, register_format
from .single import PEFT_PREFIX, adapter_keys

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")

# lora_A / lora_B (Linear, Conv) and lora_embedding_A/B, with an optional adapter name PEFT sometimes keeps.
LORA_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    # the adapter name is never "weight"/"bias": those are the parameter (lora_B.bias must not read as an adapter)
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
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
    folder: Path, label: str | None = None, config: AdapterConfig | None = None, weights: Path | None = None
) -> PeftAdapter:
    """Read a PEFT adapter folder into targeted edits (targets named as in the trained model's state dict)."""
    folder = Path(folder)
    if config is None:
        config = load_config(folder / CONFIG_NAME)
    weights = weights or find_adapter_weights(folder)
    checkpoint = Checkpoint([weights])
    label = label or str(folder)
    return PeftAdapter(folder, config, checkpoint, *edits_from_state(checkpoint, config, label, str(weights)))


def edits_from_state(
    checkpoint: Checkpoint, config: AdapterConfig, label: str, source: str
) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Group a PEFT state dict by module and turn each group into edits."""
    groups: dict[str, dict[str, str]] = {}
    edits: list[TargetedEdit] = []
    for key in checkpoint.keys():
        name = strip_peft_prefix(key)
        match = LORA_KEY_RE.match(name)
        if match:
            slot = match["kind"] + (".bias" if match["param"] == "bias" else "")
            group = groups.setdefault(match["module"], {})
            if slot in group:  # e.g. two adapter names saved in one file: never pick one silently
                raise AdapterError(f"{source}: {group[slot]!r} and {key!r} are the same LoRA tensor; keep one adapter")
            group[slot] = key
            continue
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
        if "lora_" in name or "trainable_tokens" in name:
            raise AdapterError(f"{source}: tensor {key!r} is not a LoRA tensor lorafuse understands")
        if ".original_module." in name:
            # bias="all" also saves the untrained copy a modules_to_save wrapper keeps; PEFT's merge drops it.
            continue
        # modules_to_save, trained biases and saved base layers: the stored tensor replaces the base one.
        target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        saved = Replace(TensorRef(checkpoint, key), base_copy=".base_layer." in name, adapter=label, source_key=key)
        edits.append(TargetedEdit(target, saved))
    modules: dict[str, int] = {}
    for module, slots in groups.items():
        module_edits = _module_edits(module, slots, checkpoint, config, label, source)
        modules[module] = module_edits[0].edit.rank  # type: ignore[attr-defined]
        edits.extend(module_edits)
    return edits, modules


def _module_edits(
    module: str, slots: dict[str, str], checkpoint: Checkpoint, config: AdapterConfig, label: str, source: str
) -> list[TargetedEdit]:
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
    adapter = read_peft_adapter(folder, context.label, weights=weights)
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
