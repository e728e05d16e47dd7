"""Nothing dropped or misplaced silently: per part (UNet/transformer, each text encoder) a diffusion LoRA's modules
are counted, a part the base holds that matches nothing is refused even with --allow-unmatched, and no module
lands on another part's tensors (kohya ``lora_te2_*`` on text encoder 1). kohya SD 1.5 names against diffusers'
kohya loader + fuse_lora."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_oracle import assert_merged_as, fused_unet, tiny_text_encoder, tiny_unet
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import AdapterError, LorafuseError
from lorafuse.names.parts import DENOISER, TE1, TE2, adapter_part, base_part, unprefixed_part

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def kohya_names(peft_state: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """A PEFT LoRA state dict in sd-scripts' names: flattened module, lora_down/lora_up, one alpha per module."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, _, slot = key.rpartition(".lora_")
        flat = prefix + module.replace(".", "_")
        out[f"{flat}.lora_{'down' if slot.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{flat}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    """A UNet folder, a text-encoder folder, and a kohya SD 1.5 LoRA (UNet + text encoder, alpha 3 on rank 4)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(1)
    unet, te = tiny_unet(), tiny_text_encoder()
    unet.save_pretrained(root / "unet")
    te.save_pretrained(root / "text_encoder")
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v", "proj_out", "conv1"], init_lora_weights=False))
    te = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), te)
    kohya = kohya_names(get_peft_model_state_dict(unet), "lora_unet_", 3.0)
    # sd-scripts names the text encoder through transformers 4's CLIPTextModel.text_model
    kohya |= kohya_names(get_peft_model_state_dict(te), "lora_te_text_model_", 3.0)
    save_file(kohya, root / "kohya.safetensors")
    return {"unet": root / "unet", "te": root / "text_encoder", "kohya": root / "kohya.safetensors"}


def _modules(lora: Path, prefix: str) -> int:
    return len({k.partition(".")[0] for k in load_file(lora) if k.startswith(prefix)})


def test_kohya_unet_part_merges_as_diffusers_fuses_it_and_is_counted(sd, tmp_path):
    report = lorafuse.merge(sd["unet"], [sd["kohya"]], tmp_path / "out", allow_unmatched=True)
    merged = load_file(tmp_path / "out" / UNET_WEIGHTS)
    base = load_file(sd["unet"] / UNET_WEIGHTS)
    assert_merged_as(merged, fused_unet(sd["unet"], sd["kohya"]), base)
    parts = report.adapters[0]["parts"]
    assert parts["UNet/transformer"] == {"merged": _modules(sd["kohya"], "lora_unet_"), "skipped": 0}
    assert parts["text encoder 1"] == {"merged": 0, "skipped": _modules(sd["kohya"], "lora_te_")}
    assert any("text encoder 1 part" in w and "the base holds no text encoder 1" in w for w in report.warnings)


def test_kohya_text_encoder_part_lands_on_a_text_encoder_folder(sd, tmp_path):
    report = lorafuse.merge(sd["te"], [sd["kohya"]], tmp_path / "out", allow_unmatched=True)
    parts = report.adapters[0]["parts"]
    assert parts["text encoder 1"]["merged"] == _modules(sd["kohya"], "lora_te_")
    assert parts["UNet/transformer"]["merged"] == 0
    merged, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(sd["te"] / "model.safetensors")
    lora = load_file(sd["kohya"])
    flat = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    up, down = lora[f"{flat}.lora_up.weight"], lora[f"{flat}.lora_down.weight"]
    key = "encoder.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], base[key] + 3.0 / 4 * up @ down)


def test_a_unet_part_in_a_layout_that_matches_nothing_is_refused_even_with_allow_unmatched(sd, tmp_path):
    # The same LoRA with its UNet names in the original (LDM) layout, which a diffusers UNet folder does not have.
    lora = {
        k.replace("lora_unet_down_blocks_0_attentions_0", "lora_unet_input_blocks_1_1")
        .replace("lora_unet_mid_block_attentions_0", "lora_unet_middle_block_1")
        .replace("lora_unet_up_blocks_1_attentions", "lora_unet_output_blocks_3")
        .replace("lora_unet_down_blocks", "lora_unet_input_blocks")
        .replace("lora_unet_up_blocks", "lora_unet_output_blocks")
        .replace("lora_unet_mid_block", "lora_unet_middle_block"): v
        for k, v in load_file(sd["kohya"]).items()
    }
    save_file(lora, tmp_path / "ldm.safetensors")
    for allow in (False, True):
        with pytest.raises(LorafuseError, match="UNet/transformer|--allow-unmatched"):
            lorafuse.merge(sd["unet"], [tmp_path / "ldm.safetensors"], tmp_path / "out", allow_unmatched=allow)
        assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterError, match="none of its .* UNet/transformer LoRA modules matches .* holds the UNet"):
        lorafuse.merge(sd["unet"], [tmp_path / "ldm.safetensors"], tmp_path / "out", allow_unmatched=True)
    cli = [
        "merge",
        str(sd["unet"]),
        str(tmp_path / "ldm.safetensors"),
        "-o",
        str(tmp_path / "cli"),
        "--allow-unmatched",
    ]
    assert main(cli) != 0
    assert not (tmp_path / "cli").exists()


def _sdxl_like_base(tmp_path: Path, *encoders: str) -> Path:
    """A single file holding text encoders under diffusers pipeline prefixes, all of the same shapes."""
    inner = "encoder.layers.0.self_attn.q_proj.weight"
    torch.manual_seed(2)
    save_file({f"{e}.{inner}": torch.randn(8, 8) for e in encoders}, tmp_path / "base.safetensors")
    return tmp_path / "base.safetensors"


def _te_lora(tmp_path: Path, names: list[str]) -> Path:
    torch.manual_seed(3)
    lora = {}
    for name in names:
        lora[f"{name}.lora_up.weight"] = torch.randn(8, 2)
        lora[f"{name}.lora_down.weight"] = torch.randn(2, 8)
    save_file(lora, tmp_path / "te.safetensors")
    return tmp_path / "te.safetensors"


def test_kohya_te2_never_lands_on_text_encoder_1_even_where_shapes_agree(tmp_path):
    base = _sdxl_like_base(tmp_path, "text_encoder")
    lora = _te_lora(tmp_path, ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"])
    with pytest.raises(LorafuseError, match="lora_te2_.*--allow-unmatched"):
        lorafuse.merge(base, [lora], tmp_path / "out.safetensors")
    # Only te2 LoRAs and no te2 in the base: nothing would merge, refused either way.
    with pytest.raises(LorafuseError, match="none of its 1 updates"):
        lorafuse.merge(base, [lora], tmp_path / "out.safetensors", allow_unmatched=True)


def test_sdxl_kohya_text_encoders_land_each_on_its_own(tmp_path):
    base = _sdxl_like_base(tmp_path, "text_encoder", "text_encoder_2")
    flat = "text_model_encoder_layers_0_self_attn_q_proj"
    lora = _te_lora(tmp_path, [f"lora_te1_{flat}", f"lora_te2_{flat}"])
    report = lorafuse.merge(base, [lora], tmp_path / "out.safetensors")
    assert report.adapters[0]["parts"] == {
        "text encoder 1": {"merged": 1, "skipped": 0},
        "text encoder 2": {"merged": 1, "skipped": 0},
    }
    merged, before, tensors = load_file(tmp_path / "out.safetensors"), load_file(base), load_file(lora)
    for n, encoder in ((1, "text_encoder"), (2, "text_encoder_2")):
        key = f"{encoder}.encoder.layers.0.self_attn.q_proj.weight"
        delta = tensors[f"lora_te{n}_{flat}.lora_up.weight"] @ tensors[f"lora_te{n}_{flat}.lora_down.weight"]
        torch.testing.assert_close(merged[key], before[key] + delta)


def test_sdxl_te2_part_is_skipped_where_the_base_holds_no_second_encoder(tmp_path):
    base = _sdxl_like_base(tmp_path, "text_encoder")
    flat = "text_model_encoder_layers_0_self_attn_q_proj"
    lora = _te_lora(tmp_path, [f"lora_te1_{flat}", f"lora_te2_{flat}"])
    report = lorafuse.merge(base, [lora], tmp_path / "out.safetensors", allow_unmatched=True)
    assert report.adapters[0]["parts"]["text encoder 2"] == {"merged": 0, "skipped": 1}
    assert any("text encoder 2 part (1 modules) was skipped" in w for w in report.warnings)


def test_diffusers_text_encoder_2_names_never_land_on_a_lone_text_encoder(sd, tmp_path):
    # PrefixMap alone would strip "text_encoder_2." and place the update on whatever encoder the folder holds.
    inner = "encoder.layers.0.self_attn.q_proj"
    lora = {
        f"text_encoder_2.{inner}.lora_A.weight": torch.randn(2, 16),
        f"text_encoder_2.{inner}.lora_B.weight": torch.randn(16, 2),
    }
    save_file(lora, tmp_path / "te2.safetensors")
    with pytest.raises(AdapterError, match="text encoder 2 LoRA but resolves onto"):
        lorafuse.merge(sd["te"], [tmp_path / "te2.safetensors"], tmp_path / "out")
    # An SDXL LoRA's first encoder onto a lone encoder: which one the folder is, its names do not say.
    lora |= {
        f"text_encoder.{inner}.lora_A.weight": torch.randn(2, 16),
        f"text_encoder.{inner}.lora_B.weight": torch.randn(16, 2),
    }
    lora = {k: v for k, v in lora.items() if k.startswith("text_encoder.")} | {
        f"text_encoder_2.{inner}x.lora_A.weight": torch.randn(2, 16),
        f"text_encoder_2.{inner}x.lora_B.weight": torch.randn(16, 2),
    }
    save_file(lora, tmp_path / "sdxl.safetensors")
    with pytest.raises(AdapterError, match="do not tell which of the LoRA's 2 text encoders"):
        lorafuse.merge(sd["te"], [tmp_path / "sdxl.safetensors"], tmp_path / "out", allow_unmatched=True)


def test_a_unet_lora_never_lands_on_a_text_encoder_folder(sd, tmp_path):
    # A UNet LoRA name that happens to end like a text-encoder module.
    lora = {
        "unet.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16),
        "unet.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 2),
    }
    save_file(lora, tmp_path / "u.safetensors")
    with pytest.raises(AdapterError, match="UNet/transformer LoRA but resolves onto .* text encoder 1"):
        lorafuse.merge(sd["te"], [tmp_path / "u.safetensors"], tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("lora_unet_down_blocks_0_attn1_to_q.lora_up.weight", DENOISER),
        ("lora_transformer_single_blocks_0_linear1.alpha", DENOISER),
        ("lycoris_down_blocks_0_attn1_to_q.hada_w1_a", DENOISER),
        ("lora_te_text_model_encoder_layers_0_q_proj.alpha", TE1),
        ("lora_te1_x.alpha", TE1),
        ("lora_te2_x.alpha", TE2),
        ("unet.down_blocks.0.to_q.lora_A.weight", DENOISER),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", DENOISER),
        ("text_encoder_2.text_model.x.lora_A.weight", TE2),
        ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", DENOISER),
        ("base_model.model.model.layers.0.q_proj.lora_A.weight", None),
        ("lora_prior_unet_x.alpha", None),
    ],
)
def test_adapter_part_of_names(name, part):
    assert adapter_part(name) == part


def test_base_parts_by_prefix_and_by_what_a_lone_component_holds():
    assert base_part("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") == TE2
    assert base_part("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight") == TE1
    assert base_part("model.diffusion_model.input_blocks.1.1.proj_in.weight") == DENOISER
    assert base_part("down_blocks.0.resnets.0.conv1.weight") is None
    assert unprefixed_part(["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"]) == DENOISER
    assert unprefixed_part(["embeddings.token_embedding.weight", "encoder.layers.0.mlp.fc1.weight"]) == TE1
    assert unprefixed_part(["model.layers.0.mlp.up_proj.weight"]) is None
