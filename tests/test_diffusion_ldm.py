"""SD 1.x / SDXL UNets between diffusers' layout and the original (LDM / SGM) single-file layout: lorafuse's name
tables against diffusers' own ``convert_ldm_unet_checkpoint``, and LoRAs named in one layout merged into a base in
the other against diffusers' loaders + ``fuse_lora``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
from diffusion_oracle import assert_merged_as, fused_sdxl_unet, fused_unet, tiny_text_encoder
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import lorafuse
from lorafuse.names import layout_of
from lorafuse.names.diffusers_ldm import SD_PAIRINGS, SDXL_PAIRINGS

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj", "ff.net.2"]


def sd_unet() -> UNet2DConditionModel:
    """SD 1.x's block structure (two layers per block, attentions in down blocks 0-2), tiny."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL's block structure (attentions in down blocks 1-2, deeper transformers, the text_time embedding), tiny."""
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,
    )


def to_original(pairings) -> dict[str, str]:
    """The tables as diffusers module -> original module, their block numbers spelled out."""
    names = {}
    for pairing in pairings:
        for n in range(4):
            names[pairing.pieces[0].module.replace("{n}", str(n))] = pairing.original.replace("{n}", str(n))
    return names


def original_state(unet: UNet2DConditionModel, pairings) -> dict[str, torch.Tensor]:
    names = to_original(pairings)
    state = {}
    for key, value in unet.state_dict().items():
        module, _, attr = key.rpartition(".")
        state[f"{UNET}{names[module]}.{attr}"] = value.detach().clone()
    return state


@pytest.mark.parametrize("make", [sd_unet, sdxl_unet])
def test_the_tables_are_diffusers_single_file_converter(make):
    torch.manual_seed(0)
    unet = make()
    pairings = SD_PAIRINGS if make is sd_unet else SDXL_PAIRINGS
    ldm = original_state(unet, pairings)
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    state = unet.state_dict()
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    kind = layout_of(list(ldm)).name
    assert kind == ("sd-ldm" if make is sd_unet else "sdxl-ldm")
    assert layout_of(list(state)).name == ("sd-diffusers" if make is sd_unet else "sdxl-diffusers")


def kohya_names(peft_state: dict[str, torch.Tensor], rename=lambda m: m) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in peft_state.items():
        module, _, slot = key.rpartition(".lora_")
        flat = "lora_unet_" + rename(module).replace(".", "_")
        out[f"{flat}.lora_{'down' if slot.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{flat}.alpha"] = torch.tensor(3.0)
    return out


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict:
    """An SD 1.x single file (UNet + text encoder, original names), the same UNet as a diffusers folder, a LoRA."""
    root = tmp_path_factory.mktemp("ldm")
    torch.manual_seed(1)
    unet, te = sd_unet(), tiny_text_encoder()
    unet.save_pretrained(root / "unet")
    single = original_state(unet, SD_PAIRINGS) | {TE + k: v for k, v in te.state_dict().items()}
    save_file(single, root / "sd15.safetensors")
    unet.add_adapter(LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    return {
        "root": root,
        "unet": root / "unet",
        "single": root / "sd15.safetensors",
        "lora": get_peft_model_state_dict(unet),
    }


def merged_unet_of(single: Path, config) -> dict[str, torch.Tensor]:
    """The UNet of a single file, converted to diffusers' names by diffusers' converter."""
    return convert_ldm_unet_checkpoint(load_file(single), dict(config))


def test_kohya_sd15_lora_merges_into_the_single_file_as_diffusers_fuses_it(sd, tmp_path):
    lora = kohya_names(sd["lora"])
    save_file(lora, tmp_path / "kohya.safetensors")
    te_flat = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    te_up, te_down = torch.randn(16, 2), torch.randn(2, 16)
    te_lora = {f"{te_flat}.lora_up.weight": te_up, f"{te_flat}.lora_down.weight": te_down}
    save_file(lora | te_lora, tmp_path / "with_te.safetensors")
    report = lorafuse.merge(sd["single"], [tmp_path / "kohya.safetensors"], tmp_path / "out.safetensors")
    config = UNet2DConditionModel.load_config(sd["unet"])
    merged = merged_unet_of(tmp_path / "out.safetensors", config)
    base = load_file(sd["unet"] / "diffusion_pytorch_model.safetensors")
    assert_merged_as(merged, fused_unet(sd["unet"], tmp_path / "kohya.safetensors"), base)
    modules = {k.partition(".")[0] for k in lora}
    assert report.adapters[0]["parts"] == {"UNet/transformer": {"merged": len(modules), "skipped": 0}}
    # the text encoder is copied as it was
    out, before = load_file(tmp_path / "out.safetensors"), load_file(sd["single"])
    assert all(torch.equal(out[k], before[k]) for k in before if k.startswith("cond_stage_model."))

    # with the text encoder's LoRA: it lands in cond_stage_model, the UNet merges the same
    report = lorafuse.merge(sd["single"], [tmp_path / "with_te.safetensors"], tmp_path / "te.safetensors")
    assert report.adapters[0]["parts"]["text encoder 1"] == {"merged": 1, "skipped": 0}
    both = load_file(tmp_path / "te.safetensors")
    key = f"{TE}encoder.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(both[key], before[key] + te_up @ te_down)
    assert all(torch.equal(both[k], out[k]) for k in out if k.startswith(UNET))


def test_diffusers_named_lora_merges_into_the_single_file(sd, tmp_path):
    lora = {f"unet.{k}": v.contiguous() for k, v in sd["lora"].items()}
    save_file(lora, tmp_path / "peft.safetensors")
    lorafuse.merge(sd["single"], [tmp_path / "peft.safetensors"], tmp_path / "out.safetensors")
    merged = merged_unet_of(tmp_path / "out.safetensors", UNet2DConditionModel.load_config(sd["unet"]))
    base = load_file(sd["unet"] / "diffusion_pytorch_model.safetensors")
    assert_merged_as(merged, fused_unet(sd["unet"], tmp_path / "peft.safetensors"), base)


def test_sdxl_kohya_lora_in_original_names_merges_into_a_diffusers_unet_folder(tmp_path):
    torch.manual_seed(2)
    unet = sdxl_unet()
    unet.save_pretrained(tmp_path / "unet")
    unet.add_adapter(LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    names = to_original(SDXL_PAIRINGS)
    lora = kohya_names(get_peft_model_state_dict(unet), rename=names.__getitem__)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_") for k in lora)
    save_file(lora, tmp_path / "sdxl.safetensors")
    lorafuse.merge(tmp_path / "unet", [tmp_path / "sdxl.safetensors"], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    base = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")

    assert_merged_as(merged, fused_sdxl_unet(tmp_path / "unet", tmp_path / "sdxl.safetensors"), base)


OPEN_CLIP = "conditioner.embedders.1.model."
TE1 = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_state(model) -> dict[str, torch.Tensor]:
    """transformers' CLIP names as sd-scripts and diffusers' converter spell them (``text_model.`` first)."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.detach().clone()
        for k, v in model.state_dict().items()
    }


def open_clip_state(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """An OpenCLIP text encoder as SDXL's single files store it (q, k, v fused in in_proj)."""
    out = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
    }
    for n in range(layers):
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for attr in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{attr}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{attr}"] for p in "qkv"])
            out[f"{dst}attn.out_proj.{attr}"] = hf[f"{src}self_attn.out_proj.{attr}"]
            for theirs, ours in OPEN_CLIP_NAMES.items():
                out[f"{dst}{ours}.{attr}"] = hf[f"{src}{theirs}.{attr}"]
    return {OPEN_CLIP + k: v for k, v in out.items()}


def test_sdxl_kohya_text_encoder_loras_land_in_the_single_files_clip_and_open_clip(tmp_path):
    torch.manual_seed(3)
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2)
    config.vocab_size, config.projection_dim = 100, 16
    te1, te2 = clip_state(tiny_text_encoder()), clip_state(CLIPTextModelWithProjection(config))
    single = original_state(sdxl_unet(), SDXL_PAIRINGS) | {TE1 + k[len("text_model.") :]: v for k, v in te1.items()}
    single |= open_clip_state(te2, layers=2)
    # what the file holds is diffusers' converter's OpenCLIP text encoder
    model = CLIPTextModelWithProjection(config)
    converted = convert_open_clip_checkpoint(model, single, prefix=OPEN_CLIP)
    assert converted.keys() == te2.keys() and all(torch.equal(converted[k], te2[k]) for k in te2)
    save_file(single, tmp_path / "sdxl.safetensors")

    lora, deltas = {}, {}
    for part, layer in (("te1", 0), ("te2", 0), ("te2", 1)):
        for module in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.k_proj", "self_attn.out_proj", "mlp.fc1"):
            name = f"text_model.encoder.layers.{layer}.{module}"
            out = 32 if module == "mlp.fc1" else 16
            up, down = torch.randn(out, 4), torch.randn(4, 16)
            flat = f"lora_{part}_{name.replace('.', '_')}"
            lora |= {f"{flat}.lora_up.weight": up, f"{flat}.lora_down.weight": down, f"{flat}.alpha": torch.tensor(2.0)}
            deltas[(part, f"{name}.weight")] = up @ down / 2
    save_file(lora, tmp_path / "lora.safetensors")
    report = lorafuse.merge(
        tmp_path / "sdxl.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors"
    )
    assert report.adapters[0]["parts"] == {
        "text encoder 1": {"merged": 5, "skipped": 0},
        "text encoder 2": {"merged": 10, "skipped": 0},
    }
    merged = load_file(tmp_path / "out.safetensors")
    merged_te2 = convert_open_clip_checkpoint(model, merged, prefix=OPEN_CLIP)
    for key, value in te2.items():
        want = value + deltas.get(("te2", key), 0)
        torch.testing.assert_close(merged_te2[key], want, rtol=1e-5, atol=1e-5, msg=key)
    for key, value in te1.items():
        want = value + deltas.get(("te1", key), 0)
        torch.testing.assert_close(merged[TE1 + key[len("text_model.") :]], want, rtol=1e-5, atol=1e-5, msg=key)
