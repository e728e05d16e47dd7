"""`inspect` names a diffusion LoRA's layout, algorithms and the parts it targets (with module counts): files written
by the lycoris-lora package, PEFT's diffusers LoRA state dict in diffusers' names, kohya names of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_oracle import tiny_unet
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from test_diffusion_lycoris import save_network, trained, unet_folder  # noqa: F401
from test_diffusion_parts import _modules, sd  # noqa: F401

from lorafuse.cli import main
from lorafuse.formats.describe import layout_of_key
from lorafuse.inspect import inspect_adapter

UNET = "UNet/transformer"


@pytest.mark.parametrize(
    ("algo", "options", "algorithms"),
    [
        ("locon", {}, {"lora", "locon"}),  # attention Linear layers and 1x1 / 3x3 convs
        ("loha", {"dora_wd": True}, {"loha", "dora"}),
        ("lokr", {"factor": 2, "linear_dim": 2, "conv_dim": 2}, {"lokr"}),
        ("glora", {}, {"glora"}),
        ("full", {}, {"full diff"}),
        ("diag-oft", {}, {"oft"}),
        ("boft", {}, {"boft"}),
    ],
)
def test_lycoris_files_are_named_by_layout_algorithm_and_part(unet_folder, tmp_path, algo, options, algorithms):  # noqa: F811
    _unet, network = trained(unet_folder, algo, options, seed=1)
    lora = save_network(network, tmp_path / "l.safetensors")
    described = inspect_adapter(lora)["diffusion"]
    assert described["layouts"] == ["LyCORIS"]
    assert set(described["algorithms"]) == algorithms
    assert described["parts"] == {UNET: len(network.loras)}


def test_kohya_file_with_unet_and_text_encoder_parts(sd, tmp_path, capsys):  # noqa: F811
    described = inspect_adapter(sd["kohya"])["diffusion"]
    unet, te = _modules(sd["kohya"], "lora_unet_"), _modules(sd["kohya"], "lora_te_")
    assert described == {
        "layouts": ["kohya"],
        "algorithms": described["algorithms"],
        "parts": {UNET: unet, "text encoder 1": te},
    }
    assert set(described["algorithms"]) == {"lora", "locon"}  # conv1 is a 3x3 conv: LoCon
    assert main(["inspect", str(sd["kohya"])]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("diffusion"))
    assert line.endswith(f"; {UNET} {unet} modules, text encoder 1 {te} modules")
    assert line.startswith("diffusion    kohya; ")


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory) -> dict[str, torch.Tensor]:
    """PEFT's LoRA of a tiny UNet in diffusers' names (``unet.<module>.lora_A.weight``)."""
    torch.manual_seed(2)
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    return {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def test_diffusers_and_old_diffusers_names(diffusers_lora, tmp_path):
    save_file(diffusers_lora, tmp_path / "new.safetensors")
    modules = len({k.rpartition(".lora_")[0] for k in diffusers_lora})
    new = inspect_adapter(tmp_path / "new.safetensors")["diffusion"]
    assert new == {"layouts": ["diffusers"], "algorithms": ["lora"], "parts": {UNET: modules}}

    # diffusers' attention-processor layout: <attention>.processor.to_q_lora.down.weight
    old = {
        k.replace(".to_q.lora_A.", ".processor.to_q_lora.down.")
        .replace(".to_q.lora_B.", ".processor.to_q_lora.up.")
        .replace(".to_v.lora_A.", ".processor.to_v_lora.down.")
        .replace(".to_v.lora_B.", ".processor.to_v_lora.up."): v
        for k, v in diffusers_lora.items()
    }
    save_file(old, tmp_path / "old.safetensors")
    described = inspect_adapter(tmp_path / "old.safetensors")["diffusion"]
    assert described == {"layouts": ["old diffusers"], "algorithms": ["lora"], "parts": {UNET: modules}}


def test_diffusion_model_layout(unet_folder, tmp_path):  # noqa: F811
    _unet, network = trained(unet_folder, "locon", {}, seed=1)
    lycoris = load_file(save_network(network, tmp_path / "l.safetensors"))
    save_file(
        {"diffusion_model." + k.removeprefix("lycoris_"): v for k, v in lycoris.items()}, tmp_path / "d.safetensors"
    )
    described = inspect_adapter(tmp_path / "d.safetensors")["diffusion"]
    assert described["layouts"] == ["diffusion_model"]
    assert described["parts"] == {UNET: len(network.loras)}


@pytest.mark.parametrize(
    ("key", "fmt", "layout"),
    [
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "kohya", "kohya"),
        ("lycoris_down_blocks_0_attentions_0_proj_in.hada_w1_a", "kohya", "LyCORIS"),
        (
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
            "plain",
            "old diffusers",
        ),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight", "plain", "diffusers"),
        ("model.diffusion_model.blocks.0.self_attn.q.diff", "diffusion", "diffusion_model"),
        ("double_blocks.0.processor.qkv_lora1.down.weight", "xlabs", "XLabs"),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", "peft", None),  # a language model's LoRA
    ],
)
def test_layout_of_a_tensor_name(key, fmt, layout):
    assert layout_of_key(key, fmt) == layout


def test_a_language_model_lora_gets_no_diffusion_description(tmp_path: Path):
    torch.manual_seed(0)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 2),
    }
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}'
    )
    assert inspect_adapter(folder)["diffusion"] is None
