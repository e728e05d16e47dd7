"""Which base weights are GPT-2-style ``Conv1D`` layers, from the base's config.json alone.

A ``Conv1D`` weight is stored (in, out), the transpose of a ``Linear`` one, so PEFT's ``lora_B @ lora_A`` is the
transpose of its update. PEFT decides this per layer from the module's class, whatever the adapter config's
``fan_in_fan_out`` says; lorafuse never builds the model, so it decides from the config's ``model_type`` and the
module's name. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

# transformers model types built with ``transformers.pytorch_utils.Conv1D``, and the modules that are Conv1D there.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


def _model_types(config: dict[str, Any]) -> set[str]:
    """The config's model type and those of its sub-configs (an encoder-decoder's GPT-2 decoder, for one)."""
    configs = [config] + [v for v in config.values() if isinstance(v, dict)]
    return {str(c["model_type"]) for c in configs if "model_type" in c}


def is_conv1d_model(config: dict[str, Any] | None) -> bool:
    """True when the config names a model type that has ``Conv1D`` layers."""
    return isinstance(config, dict) and bool(_model_types(config) & CONV1D_MODEL_TYPES)


def is_conv1d_weight(config: dict[str, Any] | None, weight: str) -> bool | None:
    """Whether base tensor ``weight`` belongs to a ``Conv1D`` layer; None when the config cannot tell.

    It cannot tell without a transformers config (no ``model_type``: a single file, a diffusers model) or with
    custom code (``auto_map``), which may use Conv1D anywhere.
    """
    if not isinstance(config, dict) or not _model_types(config):
        return None
    leaf = weight.rpartition(".")[0].rpartition(".")[2]
    if is_conv1d_model(config):
        return leaf in CONV1D_MODULES
    if config.get("auto_map"):
        return None
    return False
