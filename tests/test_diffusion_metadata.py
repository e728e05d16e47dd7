"""diffusers LoRA files whose alphas live in the safetensors metadata (``lora_adapter_metadata``), against diffusers'
own loaders and ``fuse_lora`` on tiny random models: the scale is alpha / r per component, with its patterns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusion_oracle import assert_merged_as, fused_text_encoder, fused_unet, tiny_text_encoder, tiny_unet
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.errors import AdapterError

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
# alpha = 2 r on most modules, another rank and alpha on to_k (rank_pattern / alpha_pattern)
UNET_LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=UNET_TARGETS,
    rank_pattern={"to_k": 2},
    alpha_pattern={"to_k": 6},
    init_lora_weights=False,
)
TE_LORA = LoraConfig(
    r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 1}, init_lora_weights=False
)


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    """A UNet folder, a text-encoder folder, and diffusers' pipeline LoRA file for both (alphas in the metadata)."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    unet.save_pretrained(root / "unet")
    te.save_pretrained(root / "text_encoder")
    unet.add_adapter(UNET_LORA)
    te = inject_adapter_in_model(TE_LORA, te)
    StableDiffusionPipeline.save_lora_weights(
        root / "lora",
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=UNET_LORA.to_dict(),
        text_encoder_lora_adapter_metadata=TE_LORA.to_dict(),
    )
    unet.save_lora_adapter(root / "unet_lora")  # the model's own save: one config, names without "unet."
    return {
        "root": root,
        "unet": root / "unet",
        "te": root / "text_encoder",
        "lora": root / "lora" / "pytorch_lora_weights.safetensors",
        "unet_lora": root / "unet_lora" / "pytorch_lora_weights.safetensors",
    }


def test_the_fixture_stores_alpha_only_in_the_metadata(sd):
    with safe_open(sd["lora"], "pt") as handle:
        assert not any(k.endswith(".alpha") for k in handle.keys())
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 8 and metadata["unet.r"] == 4
    assert metadata["text_encoder.alpha_pattern"] == {"v_proj": 1}


def test_unet_part_merges_at_alpha_over_r_as_diffusers_fuses_it(sd, tmp_path):
    report = lorafuse.merge(sd["unet"], [sd["lora"]], tmp_path / "out", allow_unmatched=True)
    merged = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    base = load_file(sd["unet"] / "diffusion_pytorch_model.safetensors")
    want = fused_unet(sd["unet"], sd["lora"])
    assert_merged_as(merged, want, base)
    # Scale 1 (the metadata ignored) would be half the update on alpha = 2 r modules: the test tells them apart.
    q = next(k for k in base if k.endswith("attn1.to_q.weight"))
    torch.testing.assert_close(merged[q] - base[q], want[q] - base[q])
    parts = report.adapters[0]["parts"]
    modules = {k.rsplit(".lora_", 1)[0] for k in load_file(sd["lora"]) if k.startswith("unet.")}
    assert parts["UNet/transformer"] == {"merged": len(modules), "skipped": 0}
    assert parts["text encoder 1"] == {"merged": 0, "skipped": 2}
    assert any("text encoder 1 part (2 modules) was skipped" in w for w in report.warnings)


def test_text_encoder_part_merges_with_its_own_alpha_pattern(sd, tmp_path):
    lorafuse.merge(sd["te"], [sd["lora"]], tmp_path / "out", allow_unmatched=True)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(sd["te"] / "model.safetensors")
    assert_merged_as(merged, fused_text_encoder(sd["te"], sd["lora"]), base)


def test_a_models_own_save_holds_one_config_for_every_module(sd, tmp_path):
    lorafuse.merge(sd["unet"], [sd["unet_lora"]], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    base = load_file(sd["unet"] / "diffusion_pytorch_model.safetensors")
    assert_merged_as(merged, fused_unet(sd["unet"], sd["unet_lora"], prefix=None), base)


def _resaved(source: Path, target: Path, metadata: dict[str, str], extra: dict[str, torch.Tensor] | None = None):
    tensors = load_file(source)
    save_file({**tensors, **(extra or {})}, target, metadata=metadata)
    return target


def test_an_alpha_tensor_beside_the_metadata_is_refused(sd, tmp_path):
    with safe_open(sd["lora"], "pt") as handle:
        metadata = handle.metadata()
    module = next(k for k in load_file(sd["lora"]) if k.startswith("unet.")).rsplit(".lora_", 1)[0]
    lora = _resaved(sd["lora"], tmp_path / "both.safetensors", metadata, {f"{module}.alpha": torch.tensor(4.0)})
    with pytest.raises(AdapterError, match="both give module"):
        lorafuse.merge(sd["unet"], [lora], tmp_path / "out", allow_unmatched=True)


def test_a_module_of_a_component_the_metadata_lacks_is_refused(sd, tmp_path):
    with safe_open(sd["lora"], "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    only_te = {k: v for k, v in metadata.items() if k.startswith("text_encoder.")}
    lora = _resaved(sd["lora"], tmp_path / "te_meta.safetensors", {"lora_adapter_metadata": json.dumps(only_te)})
    with pytest.raises(AdapterError, match="lora_alpha is unknown"):
        lorafuse.merge(sd["unet"], [lora], tmp_path / "out", allow_unmatched=True)


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"unet.use_dora": True}, "DoRA"), ({"unet.lora_alpha": "x"}, "lora_alpha"), ({"r": 0}, "r")],
)
def test_bad_metadata_is_one_line_naming_it(sd, tmp_path, fields, match):
    with safe_open(sd["lora"], "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    if "r" in fields:
        metadata = dict(fields)
    else:
        metadata.update(fields)
    lora = _resaved(sd["lora"], tmp_path / "bad.safetensors", {"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(AdapterError, match=match):
        lorafuse.merge(sd["unet"], [lora], tmp_path / "out", allow_unmatched=True)
