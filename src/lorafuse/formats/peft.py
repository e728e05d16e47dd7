"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``) read into edits.

Reproduces the semantics of PEFT's ``merge_and_unload()`` for LoRA: scaling alpha/r or alpha/sqrt(r) (rsLoRA),
``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out``, embeddings, Conv layers, DoRA, ``lora_bias``,
``modules_to_save`` and trained biases.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..edits import BiasDelta, DoraDelta, Edit, LoraDelta, Replace, RowReplace, TargetedEdit, TensorRef
from ..errors import AdapterError, InputError
from ..io.checkpoint import Checkpoint
from ..peft_flags import UNSUPPORTED_FLAGS, UNSUPPORTED_INIT, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")
PEFT_PREFIX = "base_model.model."

# lora_A / lora_B (Linear, Conv) and lora_embedding_A/B, with an optional adapter name PEFT sometimes keeps.
LORA_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    # the adapter name is never "weight"/"bias": those are the parameter (lora_B.bias must not read as an adapter)
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
# PEFT trainable tokens (trainable_token_indices): the trained rows of an embedding, replacing the base's rows.
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


@dataclass
class AdapterConfig:
    """The parts of ``adapter_config.json`` that change merge math."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: Any = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    lora_bias: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def token_indices(self, module: str, source: str) -> tuple[int, ...]:
        """The token rows PEFT trained in ``module`` (a list applies to the one embedding that has them)."""
        indices = self.trainable_token_indices
        if isinstance(indices, dict):  # module name (or its last parts) -> indices
            keys = [k for k in indices if module == k or module.endswith("." + k)]
            indices = indices[keys[0]] if len(keys) == 1 else None
        if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
            raise AdapterError(
                f"{source}: {module!r} has trainable tokens but trainable_token_indices in adapter_config.json does "
                "not list its token indices"
            )
        return tuple(indices)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> AdapterConfig:
        peft_type = str(data.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{source}: peft_type {peft_type} is not LoRA; lorafuse merges LoRA adapters only")
        for flag in UNSUPPORTED_FLAGS:
            if data.get(flag) not in (None, False, [], {}, 0):
                raise AdapterError(f"{source}: '{flag}' is not supported by lorafuse; merge this adapter with PEFT")
        init = str(data.get("init_lora_weights", True)).lower()
        if any(init.startswith(name) for name in UNSUPPORTED_INIT):
            raise AdapterError(
                f"{source}: init_lora_weights={init!r} changes the base weights; save the adapter with PEFT's "
                "path_initial_model_for_weight_conversion to get a plain LoRA, then merge that"
            )
        return cls(
            r=int(data.get("r", 8)),
            lora_alpha=float(data.get("lora_alpha", 8)),
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            target_modules=data.get("target_modules"),
            modules_to_save=data.get("modules_to_save"),
            bias=str(data.get("bias", "none")),
            lora_bias=bool(data.get("lora_bias", False)),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            revision=data.get("revision"),
            trainable_token_indices=data.get("trainable_token_indices") or None,
            raw=data,
        )

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling for ``module`` with the rank found in its weights."""
        alpha = self.lora_alpha
        pattern = _pattern_key(self.alpha_pattern, module)
        if pattern is not None:
            alpha = float(self.alpha_pattern[pattern])
        return lora_scaling(alpha, rank, self.use_rslora)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first pattern matching the end of ``module`` at a dot boundary, as PEFT matches them."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def find_adapter_weights(folder: Path) -> Path:
    """The weight file of a PEFT adapter folder."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
    raise InputError(
        f"{folder} has no adapter weights (adapter_model.safetensors, adapter_model.bin or pytorch_model.bin); "
        f"it holds: {listing}"
    )


def load_config(path: Path) -> AdapterConfig:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{path} does not exist: a PEFT adapter folder needs adapter_config.json") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}): fix or regenerate adapter_config.json") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return AdapterConfig.from_dict(data, str(path))


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
        edits.append(TargetedEdit(target, Replace(TensorRef(checkpoint, key), adapter=label, source_key=key)))
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
