"""diffusers' older LoRA layouts (attention-processor ``to_q_lora``, ``.lora.down``, ``.lora_linear_layer``) merged
onto the modules diffusers' own loaders put them on (lora_state_dict + load_lora_into_* + fuse)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_oracle import assert_merged_as, fused_text_encoder, fused_unet, tiny_text_encoder, tiny_unet
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.errors import AdapterError
from lorafuse.formats import detect_format
from lorafuse.names.diffusers_old import module_of

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
PROCESSOR = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
TEXT = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path | dict]:
    """Base folders and the PEFT LoRA state dicts (alpha = r: the older layouts carry no alpha)."""
    root = tmp_path_factory.mktemp("old")
    torch.manual_seed(4)
    unet, te = tiny_unet(), tiny_text_encoder()
    unet.save_pretrained(root / "unet")
    te.save_pretrained(root / "text_encoder")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    te_config = LoraConfig(r=2, lora_alpha=2, target_modules=list(TEXT), init_lora_weights=False)
    te = inject_adapter_in_model(te_config, te)
    unet_state = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    te_state = {k: v.contiguous() for k, v in get_peft_model_state_dict(te).items()}
    return {
        "root": root,
        "unet": root / "unet",
        "te": root / "text_encoder",
        "unet_lora": unet_state,
        "te_lora": te_state,
    }


def renamed(state: dict[str, torch.Tensor], prefix: str, rename) -> dict[str, torch.Tensor]:
    """``<module>.lora_A/B.weight`` -> the older layout's names, under ``prefix``."""
    out = {}
    for key, value in state.items():
        module, _, slot = key.rpartition(".lora_")
        out[prefix + rename(module) + (".down.weight" if slot.startswith("A") else ".up.weight")] = value
    return out


def processor_names(module: str) -> str:
    attention, _, projection = module.rpartition(".to_")
    name = "to_" + projection
    if name in PROCESSOR and attention.endswith(("attn1", "attn2")):
        return f"{attention}.processor.{PROCESSOR[name]}"
    return f"{module}.lora"  # LoRACompatibleConv/Linear for the other layers


def text_processor_names(module: str) -> str:
    attention, _, projection = module.rpartition(".")
    return f"{attention}.{TEXT[projection]}"


@pytest.mark.parametrize("layout", ["processor", "lora"])
def test_older_unet_layouts_merge_as_diffusers_loads_them(sd, tmp_path, layout):
    rename = processor_names if layout == "processor" else (lambda m: f"{m}.lora")
    lora = renamed(sd["unet_lora"], "unet.", rename)
    assert any(".processor.to_out_lora." in k for k in lora) == (layout == "processor")
    save_file(lora, tmp_path / "old.safetensors")
    assert detect_format(tmp_path / "old.safetensors") == "plain"
    lorafuse.merge(sd["unet"], [tmp_path / "old.safetensors"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / UNET_WEIGHTS)
    base = load_file(sd["unet"] / UNET_WEIGHTS)
    assert_merged_as(merged, fused_unet(sd["unet"], tmp_path / "old.safetensors"), base)

    # An attention-processor file saved by a UNet alone carries no "unet." prefix: the same merge.
    save_file(renamed(sd["unet_lora"], "", rename), tmp_path / "bare.safetensors")
    lorafuse.merge(sd["unet"], [tmp_path / "bare.safetensors"], tmp_path / "bare")
    bare = load_file(tmp_path / "bare" / UNET_WEIGHTS)
    assert all(torch.equal(bare[k], merged[k]) for k in merged)


@pytest.mark.parametrize("layout", ["processor", "lora_linear_layer"])
def test_older_text_encoder_layouts_merge_as_diffusers_loads_them(sd, tmp_path, layout):
    rename = text_processor_names if layout == "processor" else (lambda m: f"{m}.lora_linear_layer")
    save_file(renamed(sd["te_lora"], "text_encoder.", rename), tmp_path / "old.safetensors")
    lorafuse.merge(sd["te"], [tmp_path / "old.safetensors"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(sd["te"] / "model.safetensors")
    assert_merged_as(merged, fused_text_encoder(sd["te"], tmp_path / "old.safetensors"), base)


def test_old_names_map_by_part():
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert module_of(f"unet.{attn}.processor.to_out_lora") == f"unet.{attn}.to_out.0"
    assert module_of(f"{attn}.processor.to_k_lora") == f"{attn}.to_k"
    layer = "text_encoder.text_model.encoder.layers.0.self_attn"
    assert module_of(f"{layer}.to_out_lora") == f"{layer}.out_proj"
    assert module_of(f"{layer}.q_proj.lora_linear_layer") == f"{layer}.q_proj"
    assert module_of("text_encoder.text_projection.lora") == "text_encoder.text_projection"
    assert module_of(f"{attn}.to_q") is None


def test_an_up_weight_outside_the_older_layouts_is_refused(sd, tmp_path):
    lora = renamed(sd["unet_lora"], "unet.", lambda m: f"{m}.lora")
    key = next(iter(lora))
    lora[key.replace(".lora.", ".foo.")] = lora.pop(key)
    save_file(lora, tmp_path / "odd.safetensors")
    with pytest.raises(AdapterError, match="foo.*is not a LoRA tensor this format understands"):
        lorafuse.merge(sd["unet"], [tmp_path / "odd.safetensors"], tmp_path / "out")
