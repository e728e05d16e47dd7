"""Train a LoRA without PEFT: :func:`inject_lora` adds fresh trainable LoRA layers, :func:`save_adapter` writes them
as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that PEFT and ``lorafuse merge`` load.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..formats.peft import PEFT_PREFIX
from ..formats.peft_writer import write_peft_adapter
from ..torch_bridge import to_numpy
from .apply import lora_modules, runtime_state, unwrappable, wrap_layer
from .layers import LoraModule, LoraPatch, adapter_dtype, layer_kind

log = logging.getLogger("lorafuse")


def named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module by its name in the unwrapped model (a runtime wrapper counts as the layer it wraps)."""
    found: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, name: str) -> None:
        if isinstance(module, LoraModule):
            walk(module.base_layer, name)
            return
        found.append((name, module))
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    return found


def _output_layer(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name, a list matches names ending in an entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _new_patch(layer: nn.Module, rank: int, scale: float, dropout: float) -> LoraPatch:
    weight = layer.weight
    dtype, device = adapter_dtype(weight), weight.device
    if isinstance(layer, nn.Embedding):
        # PEFT's embedding init: A zero, B standard normal.
        A = torch.zeros(rank, layer.num_embeddings, dtype=dtype, device=device)
        B = torch.randn(layer.embedding_dim, rank, dtype=dtype, device=device)
        return LoraPatch("embedding", A, B, scale, transposed=True, dropout=dropout, trainable=True)
    # PEFT's Linear init: A as nn.Linear's default (Kaiming-uniform, a=sqrt(5)), B zero.
    A = torch.empty(rank, layer.in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = torch.zeros(layer.out_features, rank, dtype=dtype, device=device)
    return LoraPatch("linear", A, B, scale, dropout=dropout, trainable=True)


def inject_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    name: str = "default",
) -> list[str]:
    """Wrap the ``nn.Linear`` / ``nn.Embedding`` layers named by ``target_modules`` with new trainable LoRA.

    ``target_modules`` follows PEFT: a list of module names or name endings (``["q_proj", "v_proj"]``), a regex
    matched against the full module name, or ``"all-linear"`` (every Linear except the output head). A starts as
    PEFT starts it and B at zero (embeddings: A zero, B random), so the model's outputs are unchanged at first.
    Every base parameter is frozen; only the new LoRA tensors train. Returns the names of the wrapped layers.
    """
    if rank <= 0:
        raise AdapterError(f"rank must be a positive integer, got {rank}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    state = runtime_state(model)
    assert state is not None
    if name in state.adapters:
        raise AdapterError(f"the model already has an adapter named {name!r}: pass another name")
    head = _output_layer(model)
    skip = unwrappable(model)
    chosen: list[tuple[str, nn.Module]] = []
    for module_name, layer in named_layers(model):
        if not module_name or layer_kind(layer) is None or layer_kind(layer) == "conv":
            continue
        if not isinstance(layer, (nn.Linear, nn.Embedding)) or id(layer) in skip:
            continue
        if target_modules == "all-linear":
            hit = isinstance(layer, nn.Linear) and layer is not head and not module_name.endswith("lm_head")
        else:
            hit = _matches(module_name, target_modules)
        if hit:
            chosen.append((module_name, layer))
    if not chosen:
        raise AdapterError(f"target_modules {target_modules!r} matched no nn.Linear or nn.Embedding layer of the model")
    for param in model.parameters():
        param.requires_grad_(False)
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    for _module_name, layer in chosen:
        wrap_layer(model, layer).lora[name] = _new_patch(layer, rank, scale, dropout)
    names = [n for n, _ in chosen]
    if target_modules == "all-linear":
        target_modules = sorted({n.rsplit(".", 1)[-1] for n in names})
    state.adapters[name] = {
        "label": name,
        "layers": len(names),
        "config": {
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "use_rslora": use_rslora,
            "target_modules": target_modules,
        },
    }
    log.info("inject_lora: wrapped %d layers with rank-%d LoRA %r", len(names), rank, name)
    return names


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (``base_model.model.<module>.lora_A.weight`` ...)."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, wrapper in lora_modules(model):
        patch = wrapper.lora[name] if name in wrapper.lora else None
        if patch is None:
            continue
        prefix = PEFT_PREFIX + module_name
        if patch.kind == "embedding":
            tensors[f"{prefix}.lora_embedding_A"] = patch.lora_A
            tensors[f"{prefix}.lora_embedding_B"] = patch.lora_B
        else:
            tensors[f"{prefix}.lora_A.weight"] = patch.lora_A
            tensors[f"{prefix}.lora_B.weight"] = patch.lora_B
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default", overwrite: bool = False) -> Path:
    """Write the adapter :func:`inject_lora` created as a PEFT adapter folder (atomically) and return its path.

    Refuses an existing non-empty ``folder`` unless ``overwrite``.
    """
    state = runtime_state(model, create=False)
    info: dict[str, Any] = (state.adapters.get(name) or {}) if state else {}
    if "config" not in info:
        raise AdapterError(f"the model has no adapter {name!r} created by inject_lora: nothing to save")
    tensors = {key: to_numpy(value) for key, value in adapter_state_dict(model, name).items()}
    model_config = getattr(model, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model_config, "name_or_path", None) or None,
        "inference_mode": True,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        **info["config"],
    }
    return write_peft_adapter(folder, tensors, config, overwrite=overwrite)
