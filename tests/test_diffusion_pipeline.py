"""diffusers pipeline folders as bases (pipeline.py), against diffusers itself: a tiny random SD pipeline saved with
``save_pretrained``, a kohya LoRA on its UNet and text encoder, and diffusers' ``load_lora_weights`` + ``fuse_lora``
on the same pipeline as the oracle. Per-part strengths (``--part-weight``) are in test_part_weight.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import InputError, LorafuseError

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusion_oracle import fused_sdxl_unet, tiny_text_encoder, tiny_unet, tiny_vae  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")
RANK, ALPHA = 4, 2.0


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_pipeline(root: Path) -> Path:
    """A random SD 1.x-shaped pipeline saved as diffusers saves one (model_index.json, one folder per component)."""
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    vae = tiny_vae()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tiny_tokenizer(root / "tokenizer_src"),
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def kohya_lora(pipe: Path, path: Path, parts: tuple[str, ...] = ("unet", "te"), seed: int = 1) -> Path:
    """A kohya LoRA file (``lora_unet_*``, ``lora_te_*``: flattened module names, ``.alpha``) for ``pipe``."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    sources = {
        "unet": (pipe / "unet" / "diffusion_pytorch_model.safetensors", UNET_TARGETS),
        "te": (pipe / "text_encoder" / "model.safetensors", TE_TARGETS),
        "te1": (pipe / "text_encoder" / "model.safetensors", TE_TARGETS),
        "te2": (pipe / "text_encoder_2" / "model.safetensors", TE_TARGETS),
    }
    for part in parts:
        file, targets = sources[part]
        for key, weight in load_file(file).items():
            module = key.removesuffix(".weight")
            if not key.endswith(".weight") or weight.ndim != 2 or not module.endswith(targets):
                continue
            if part.startswith("te") and not module.startswith("text_model."):
                module = f"text_model.{module}"  # kohya names CLIP's modules as the model class nests them
            name = f"lora_{part}_{module.replace('.', '_')}"
            tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, weight.shape[1], generator=gen) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], RANK, generator=gen) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, path)
    return path


def fused(
    pipe: Path, lora: Path, unet_scale: float = 1.0, te_scale: float = 1.0, cls: type = StableDiffusionPipeline
) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' merge of ``lora`` into the pipeline: load_lora_weights, fuse_lora per component at its scale."""
    pipeline = cls.from_pretrained(pipe)
    pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name)
    encoders = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipeline, c, None) is not None]
    pipeline.fuse_lora(components=["unet"], lora_scale=unet_scale)
    pipeline.fuse_lora(components=encoders, lora_scale=te_scale)
    pipeline.unload_lora_weights()
    return {c: {k: v.detach() for k, v in getattr(pipeline, c).state_dict().items()} for c in ("unet", *encoders)}


WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
}


def assert_pipeline_merged(out: Path, base: Path, want: dict[str, dict[str, torch.Tensor]]) -> None:
    for comp, want_tensors in want.items():
        merged, stored = load_file(out / WEIGHT_FILES[comp]), load_file(base / WEIGHT_FILES[comp])
        assert set(merged) == set(stored), comp
        changed = [k for k in stored if not torch.equal(want_tensors[k], stored[k])]
        assert changed, f"the oracle changed nothing in {comp}: the test would prove nothing"
        for name in stored:
            torch.testing.assert_close(merged[name], want_tensors[name], rtol=1e-5, atol=1e-6, msg=f"{comp}.{name}")


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    pipe = tiny_pipeline(root)
    return {"pipe": pipe, "lora": kohya_lora(pipe, root / "kohya.safetensors")}


def test_kohya_lora_merges_into_each_component_as_diffusers_fuses_it(sd, tmp_path):
    out = tmp_path / "merged"
    report = lorafuse.merge(sd["pipe"], [sd["lora"]], out)
    assert_pipeline_merged(out, sd["pipe"], fused(sd["pipe"], sd["lora"]))
    # untouched component and files: byte for byte; everything the pipeline holds is there
    vae = WEIGHT_FILES["vae"]
    assert (out / vae).read_bytes() == (sd["pipe"] / vae).read_bytes()
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json", "unet/config.json"):
        assert (out / rel).read_bytes() == (sd["pipe"] / rel).read_bytes(), rel
    provenance = json.loads((out / "lorafuse_merge.json").read_text())
    assert provenance["files"] == report.files
    assert set(report.files) == {WEIGHT_FILES[c] for c in ("unet", "text_encoder", "vae")}
    assert not list(out.glob("*/lorafuse_merge.json"))  # one provenance file, at the top
    parts = report.adapters[0]["parts"]
    assert parts["UNet/transformer"]["merged"] > 0 and parts["text encoder 1"]["merged"] > 0
    # the merged folder is a pipeline diffusers loads
    loaded = StableDiffusionPipeline.from_pretrained(out)
    assert loaded.unet is not None and loaded.text_encoder is not None


def test_a_unet_only_lora_leaves_the_text_encoder_bytes_alone(sd, tmp_path):
    lora = kohya_lora(sd["pipe"], tmp_path / "unet_only.safetensors", parts=("unet",))
    out = tmp_path / "merged"
    lorafuse.merge(sd["pipe"], [lora], out)
    te = WEIGHT_FILES["text_encoder"]
    assert (out / te).read_bytes() == (sd["pipe"] / te).read_bytes()
    merged = load_file(out / WEIGHT_FILES["unet"])
    want = fused(sd["pipe"], lora)["unet"]
    for name, value in merged.items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_cli_merges_a_pipeline_and_dry_run_lists_its_files(sd, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(sd["pipe"]), str(sd["lora"]), "-o", str(out), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "unet/diffusion_pytorch_model.safetensors" in report["files"]
    assert {"scheduler", "tokenizer", "unet", "vae", "model_index.json"} <= set(report["copied_files"])
    assert not out.exists()
    assert main(["merge", str(sd["pipe"]), str(sd["lora"]), "-o", str(out), "--dtype", "fp16", "-q"]) == 0
    merged = load_file(out / WEIGHT_FILES["unet"])
    assert all(v.dtype == torch.float16 for v in merged.values())
    vae = WEIGHT_FILES["vae"]  # no LoRA targets the VAE: copied as stored, whatever --dtype
    assert (out / vae).read_bytes() == (sd["pipe"] / vae).read_bytes()
    assert json.loads((out / "text_encoder" / "config.json").read_text()).get("dtype", "float16") == "float16"


def test_a_part_the_pipeline_holds_whose_names_match_nothing_is_refused(sd, tmp_path):
    tensors = load_file(sd["lora"])
    renamed = {k.replace("lora_te_text_model_encoder_", "lora_te_text_model_encodr_"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "bad.safetensors")
    for allow, match in ((False, "does not have"), (True, "text encoder 1 LoRA .* matches a tensor")):
        with pytest.raises(LorafuseError, match=match):
            lorafuse.merge(sd["pipe"], [tmp_path / "bad.safetensors"], tmp_path / "out", allow_unmatched=allow)
        assert not (tmp_path / "out").exists()


def test_a_single_file_output_of_a_pipeline_is_refused(sd, tmp_path):
    with pytest.raises(LorafuseError, match="pipeline folder"):
        lorafuse.merge(sd["pipe"], [sd["lora"]], tmp_path / "out.safetensors")


def test_a_component_linked_out_of_the_pipeline_is_refused(sd, tmp_path):
    pipe = tmp_path / "pipe"
    outside = tmp_path / "outside_vae"
    os.mkdir(pipe)
    for entry in sd["pipe"].iterdir():
        if entry.name != "vae":
            _copy(entry, pipe / entry.name)
    _copy(sd["pipe"] / "vae", outside)
    os.symlink(outside, pipe / "vae")
    with pytest.raises(InputError, match="outside the model folder"):
        lorafuse.merge(pipe, [sd["lora"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def tiny_sdxl_pipeline(root: Path) -> Path:
    """A random SDXL-shaped pipeline (two text encoders, text_time conditioning) saved by diffusers."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=64,  # 6 time ids x 8 + text encoder 2's projection (16)
        cross_attention_dim=32,  # both text encoders' hidden states side by side
        norm_num_groups=8,
    )
    config = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=100)
    vae = tiny_vae()
    tokenizer = tiny_tokenizer(root / "tokenizer_src")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=16)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
    )
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


def test_kohya_sdxl_lora_lands_on_each_text_encoder_of_an_sdxl_pipeline(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    lora = kohya_lora(pipe, tmp_path / "kohya_sdxl.safetensors", parts=("unet", "te1", "te2"))
    out = tmp_path / "merged"
    report = lorafuse.merge(pipe, [lora], out, part_weights=["te2=0.5"])
    want = fused(pipe, lora, cls=StableDiffusionXLPipeline)
    assert_pipeline_merged(out, pipe, {k: v for k, v in want.items() if k != "text_encoder_2"})
    half = fused(pipe, lora, te_scale=0.5, cls=StableDiffusionXLPipeline)["text_encoder_2"]
    assert_pipeline_merged(out, pipe, {"text_encoder_2": half})
    parts = report.adapters[0]["parts"]
    assert parts["text encoder 1"]["merged"] == parts["text encoder 2"]["merged"] == len(TE_TARGETS)


def test_a_diffusers_pipeline_lora_file_merges_into_the_pipeline(sd, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_pretrained(sd["pipe"] / "unet")
    te = CLIPTextModel.from_pretrained(sd["pipe"] / "text_encoder")
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False)
    te_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False)
    unet.add_adapter(unet_config)
    te = inject_adapter_in_model(te_config, te)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    lorafuse.merge(sd["pipe"], [lora], tmp_path / "merged")
    assert_pipeline_merged(tmp_path / "merged", sd["pipe"], fused(sd["pipe"], lora))


def test_verify_of_a_pipeline_merge_is_refused_before_writing(sd, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(sd["pipe"]), str(sd["lora"]), "-o", str(out), "--verify"]) != 0
    assert "--verify does not check diffusers pipeline folders" in capsys.readouterr().err
    assert not out.exists()


def test_kohya_sdxl_lora_in_original_block_names_merges_into_an_sdxl_pipeline(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_diffusion_ldm import TARGETS, kohya_names, sdxl_unet, to_original

    from lorafuse.names.diffusers_ldm import SDXL_PAIRINGS

    pipe = tiny_sdxl_pipeline(tmp_path)
    torch.manual_seed(5)
    unet = sdxl_unet()  # SDXL's block structure: the original-name map applies to it only
    shutil.rmtree(pipe / "unet")
    unet.save_pretrained(pipe / "unet")
    unet.add_adapter(LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    lora = kohya_names(get_peft_model_state_dict(unet), rename=to_original(SDXL_PAIRINGS).__getitem__)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_") for k in lora)
    save_file(lora, tmp_path / "sdxl_ldm.safetensors")
    out = tmp_path / "merged"
    report = lorafuse.merge(pipe, [tmp_path / "sdxl_ldm.safetensors"], out)
    assert_pipeline_merged(out, pipe, {"unet": fused_sdxl_unet(pipe / "unet", tmp_path / "sdxl_ldm.safetensors")})
    assert report.adapters[0]["parts"]["UNet/transformer"]["merged"] > 0
    for comp in ("text_encoder", "text_encoder_2", "vae"):
        assert (out / WEIGHT_FILES[comp]).read_bytes() == (pipe / WEIGHT_FILES[comp]).read_bytes()
