"""Tiny models and PEFT adapters for tests: built from transformers configs with fixed seeds, no hub access.

Builders save into a folder and return its path, so tests exercise the same files a user would have. Adapters are
created with ``init_lora_weights=False`` and then every trainable tensor is re-randomized (lora_B != 0, DoRA
magnitudes, ``modules_to_save`` copies and trained biases moved off their base values), so a merge that drops or
mishandles any of them changes the result and the test fails.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

VOCAB = 128


def _save(model: torch.nn.Module, folder: Path, dtype: torch.dtype, **save_kwargs) -> Path:
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder, **save_kwargs)
    return folder


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values (transformers' init leaves norms at 1 and biases at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_((param.float() + 0.05 * noise).to(param.dtype) if param.dim() < 2 else 0.05 * noise)


def make_llama(
    root: Path,
    *,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    model_type: str = "llama",
    seed: int = 0,
    name: str | None = None,
    hidden_size: int = 32,
    save_kwargs: dict | None = None,
) -> Path:
    """A 2-layer Llama (or ``model_type="qwen2"``: attention biases) causal LM saved in ``root/name``.

    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``, ``safe_serialization``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, seed)
    return _save(
        model, Path(root) / (name or f"{model_type}-{'tied' if tie else 'untied'}"), dtype, **(save_kwargs or {})
    )


def make_gpt2(root: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, name: str = "gpt2") -> Path:
    """A 2-layer GPT-2 LM (Conv1D layers, biases, tied head) saved in ``root/name``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    _randomize(model, seed)
    return _save(model, Path(root) / name, dtype)


def make_bert(
    root: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, head: bool = True, name: str | None = None
) -> Path:
    """A 2-layer BERT saved in ``root/name``: from ``BertForMaskedLM`` (tensor names start with ``bert.``), or with
    ``head=False`` from the bare ``BertModel`` (names start with ``encoder.``/``embeddings.``)."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config) if head else BertModel(config)
    _randomize(model, seed)
    return _save(model, Path(root) / (name or ("bert-mlm" if head else "bert-bare")), dtype)


def causal_lm_class(model_dir: Path):
    """The transformers Auto class matching a saved model (causal LM unless it is BERT)."""
    from transformers import AutoModel, AutoModelForCausalLM

    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    return AutoModel if model_type == "bert" else AutoModelForCausalLM


def load_model(model_dir: Path, model_cls=None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cls = model_cls or causal_lm_class(model_dir)
    return cls.from_pretrained(model_dir, dtype=dtype).eval()


def randomize_trainable(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable tensor of a PEFT model off its initial value, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                param.copy_(0.1 * noise) if param.dim() > 1 else param.add_(0.1 * noise)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise)
            else:  # modules_to_save copies and trained biases
                param.add_(0.1 * noise)


def make_peft_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    model_cls=None,
    module: nn.Module | None = None,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
    randomize: bool = True,
    **lora_config_kwargs,
) -> Path:
    """A PEFT LoRA adapter for the model in ``model_dir`` (or the given custom ``module``) saved in ``out_dir``.

    ``lora_config_kwargs`` go to :class:`peft.LoraConfig`; ``init_lora_weights`` defaults to False and every
    trainable tensor is then randomized so the adapter has an effect through each of its parts (``randomize=False``
    keeps PEFT's initialization, e.g. lora_B all zeros with ``init_lora_weights=True``).
    """
    lora_config_kwargs.setdefault("init_lora_weights", False)
    lora_config_kwargs.setdefault("r", 4)
    lora_config_kwargs.setdefault("lora_alpha", 8)
    model = module if module is not None else load_model(model_dir, model_cls, dtype)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora_config_kwargs))
    if randomize:
        randomize_trainable(peft_model, seed)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def peft_model(
    model_dir: Path,
    adapters: Sequence[Path],
    weights: Sequence[float] | None = None,
    *,
    model_cls=None,
    module: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
) -> PeftModel:
    """Base model with every adapter loaded and active, each adapter's LoRA scaling multiplied by its weight."""
    from peft.tuners.lora import LoraLayer

    base = module if module is not None else load_model(model_dir, model_cls, dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name, weight in zip(names, weights):
                if name in layer.scaling:
                    layer.scaling[name] *= weight
    model.base_model.set_adapter(names)
    return model.eval()


def peft_merged(model_dir: Path, adapters: Sequence[Path], weights: Sequence[float] | None = None, **kwargs):
    """PEFT's ``merge_and_unload`` of the adapters, applied in order with their weights."""
    model = peft_model(model_dir, adapters, weights, **kwargs)
    return model.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))]).eval()


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def input_ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class TinyConvNet(nn.Module):
    """A model transformers cannot load: 3x3 and 1x1 Conv2d, a Linear head. Saved as a bare safetensors file."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.head(self.conv2(x).mean(dim=(2, 3)))


def make_conv_net(root: Path, *, seed: int = 0, name: str = "convnet") -> Path:
    """A :class:`TinyConvNet` saved as ``root/name/model.safetensors`` (no config.json)."""
    torch.manual_seed(seed)
    net = TinyConvNet()
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    return folder


def load_conv_net(folder: Path) -> TinyConvNet:
    net = TinyConvNet()
    net.load_state_dict(load_file(Path(folder) / "model.safetensors"))
    return net.eval()


def conversion_path(request, monkeypatch, *modules) -> str:
    """For a fixture parametrized ``["compiled", "numpy"]``: the test runs on lorafuse's compiled conversions
    (fastcast.py; skipped where the extension is not built) or with them off in each of ``modules``."""
    from lorafuse import fastcast

    if request.param == "compiled" and fastcast.FAST is None:
        pytest.skip("the C extension is not built here")
    if request.param == "numpy":
        for module in modules:
            monkeypatch.setattr(module, "FAST", None)
    return request.param
