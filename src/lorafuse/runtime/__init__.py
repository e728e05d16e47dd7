"""On-the-fly LoRA for torch models, without PEFT: apply adapters to a live model, remove or merge them, and
train new ones (:func:`inject_lora` + :func:`save_adapter` write a PEFT-format adapter)."""

from .apply import adapter_names, apply_adapter, merge_into, remove_adapter
from .inject import adapter_state_dict, inject_lora, save_adapter
from .layers import LoraModule, LoraPatch

__all__ = [
    "LoraModule",
    "LoraPatch",
    "adapter_names",
    "adapter_state_dict",
    "apply_adapter",
    "inject_lora",
    "merge_into",
    "remove_adapter",
    "save_adapter",
]
