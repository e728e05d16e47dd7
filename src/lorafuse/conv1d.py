"""Which base weights are GPT-2-style ``Conv1D`` layers: from ``--conv1d-modules``, or the base's config.json.

A ``Conv1D`` weight is stored (in, out), the transpose of a ``Linear`` one, so PEFT's ``lora_B @ lora_A`` is the
transpose of its update. PEFT decides this per layer from the module's class; the adapter config's one
``fan_in_fan_out`` flag is only the value PEFT set for the last layer it wrapped, so it settles nothing for the
others. lorafuse never builds the model, so it decides from what names the layer classes: the user's list of
Conv1D modules, or the config's ``model_type`` and the module's name. Where neither tells, a square weight fits
both orientations and its update is refused with :data:`ORIENTATION_FIX` (plan.py, edits.py). Nothing here
imports torch.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .errors import InputError

# transformers model types built with ``transformers.pytorch_utils.Conv1D``, and the modules that are Conv1D there
# (read from transformers' modeling code: gpt2, openai, imagegpt, decision_transformer, clvp).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# transformers model types whose MoE experts (3-D parameters of their ``experts`` module) are stored (experts, in,
# out): ``use_experts_implementation(is_transposed=True)`` in their modeling code; every other model's experts are
# stored (experts, out, in). The same question as Conv1D's, so the same answer (True: stored (in, out)).
TRANSPOSED_EXPERTS_MODEL_TYPES = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})
EXPERTS_MODULE = "experts"
EXPERTS_PARAMETERS = frozenset({"gate_up_proj", "down_proj"})  # their 3-D ones (not gate_up_proj_bias, ...)
# ``--conv1d-modules none``: the base has no Conv1D layer.
NO_CONV1D = "none"
ORIENTATION_FIX = (
    "pass the base model folder with its config.json, or name its GPT-2 Conv1D modules with --conv1d-modules "
    f"NAMES (--conv1d-modules {NO_CONV1D} when it has none)"
)


def conv1d_modules(value: str | Collection[str] | None) -> frozenset[str] | None:
    """``--conv1d-modules`` (comma-separated, or a list from the API) as module names; None when not given.

    ``none`` is the empty set: no layer of the base is a Conv1D layer.
    """
    if value is None:
        return None
    given = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() if isinstance(n, str) else n for n in given]
    if names == [NO_CONV1D]:
        return frozenset()
    if not names or any(not isinstance(n, str) or not n or n == NO_CONV1D for n in names):
        raise InputError(
            f"--conv1d-modules {value!r} is not a list of module names: give them comma-separated (c_attn,c_proj) "
            f"or {NO_CONV1D}"
        )
    return frozenset(names)


def _model_types(config: dict[str, Any]) -> set[str]:
    """The config's model type and those of its sub-configs (an encoder-decoder's GPT-2 decoder, for one)."""
    configs = [config] + [v for v in config.values() if isinstance(v, dict)]
    return {str(c["model_type"]) for c in configs if "model_type" in c}


def is_conv1d_model(config: dict[str, Any] | None) -> bool:
    """True when the config names a model type that has ``Conv1D`` layers."""
    return isinstance(config, dict) and bool(_model_types(config) & CONV1D_MODEL_TYPES)


def _is_diffusers_config(config: dict[str, Any]) -> bool:
    """A diffusers model's config.json: diffusers builds its layers from torch's ``nn.Linear``, never Conv1D."""
    return "_class_name" in config and "_diffusers_version" in config


def is_conv1d_weight(config: dict[str, Any] | None, weight: str, named: Collection[str] | None = None) -> bool | None:
    """Whether base tensor ``weight`` is stored (in, out): a ``Conv1D`` layer's, or a transposed MoE experts
    parameter (see :data:`TRANSPOSED_EXPERTS_MODEL_TYPES`); None when nothing tells.

    ``named`` (``--conv1d-modules``) decides when given: a module named there (its full name or its last parts)
    is Conv1D, every other is not. Else the config decides; it cannot without a transformers config (no
    ``model_type``: a single file, a custom model) or with custom code (``auto_map``), which may use Conv1D
    anywhere.
    """
    module = weight.rpartition(".")[0]
    if named is not None:
        return any(module == n or module.endswith("." + n) for n in named)
    if not isinstance(config, dict):
        return None
    if config.get("auto_map"):
        return None
    if _is_diffusers_config(config):
        return False
    if not _model_types(config):
        return None
    leaf = module.rpartition(".")[2]
    if is_conv1d_model(config):
        return leaf in CONV1D_MODULES
    if _model_types(config) & TRANSPOSED_EXPERTS_MODEL_TYPES:
        return leaf == EXPERTS_MODULE and weight.rpartition(".")[2] in EXPERTS_PARAMETERS
    return False
