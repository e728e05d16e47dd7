"""Tiny models and PEFT adapters for the tuner tests (test_tuners_*.py), whose oracle is PEFT's ``merge_and_unload``.

Models are built from transformers configs (or are bare ``nn.Module`` s saved as one safetensors file, without
config.json) with fixed seeds; adapters have every trainable tensor moved off PEFT's initialisation, so a merge that
drops or mishandles one changes the result.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from helpers import VOCAB
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn


def tiny_lm(root: Path, model_type: str) -> Path:
    """A 1-layer causal LM of ``model_type`` (hidden 32; GPT-2 has Conv1D layers) saved in ``root/model_type``."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if model_type == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    else:
        config = AutoConfig.for_model(
            model_type,
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    folder = root / model_type
    model.save_pretrained(folder)
    return folder


def tiny_qwen3(folder: Path, *, attention_bias: bool = False) -> Path:
    """A 1-layer Qwen3 (head_dim 8, q/k norms; ``attention_bias``: biased q/k/v/o) saved in ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        attention_bias=attention_bias,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape))  # biases start at zero: IA3 would scale zeros
    model.save_pretrained(folder)
    return folder


def nudge_trainable(model: nn.Module, scale: float, seed: int) -> None:
    """Add ``scale`` * noise to every trainable floating tensor of a PEFT model (many start at zero or identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.add_(scale * torch.randn(param.shape, generator=gen))


def train_and_save(base: nn.Module, config: PeftConfig, out: Path) -> dict[str, torch.Tensor]:
    """Save a nudged adapter of ``config`` on a copy of ``base`` in ``out``; PEFT's merge of it, as the oracle."""
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), config)
    nudge_trainable(model, 0.2, seed=1)
    model.save_pretrained(out)
    with torch.no_grad():
        return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def peft_merged_in_turn(
    model: nn.Module, adapters: Sequence[Path], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's merge of the adapters in order, each scaled by its weight (the ``scaling`` every tuner layer keeps):
    PEFT cannot hold adapters of different tuner types at once, so each is merged before the next is loaded."""
    for path, weight in zip(adapters, weights or [1.0] * len(adapters)):
        peft_model = PeftModel.from_pretrained(model, path)
        for layer in peft_model.modules():
            scaling = getattr(layer, "scaling", None)
            if isinstance(scaling, dict) and "default" in scaling:
                scaling["default"] *= weight
        model = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_module(net: nn.Module, folder: Path) -> Path:
    """``net``'s state as ``folder/model.safetensors`` (a base without config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    return folder


def load_module(net: nn.Module, folder: Path) -> nn.Module:
    """``net`` with the state :func:`save_module` saved in ``folder``, in eval mode."""
    net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval()
