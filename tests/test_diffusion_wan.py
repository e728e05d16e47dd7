"""Wan LoRAs across Wan's two layouts, against diffusers as the oracle.

A tiny random Wan (I2V: image embedder and image cross-attention) checkpoint in the original layout
(``blocks.N.self_attn.q``, ``ffn.0``, ``modulation``) is converted with diffusers' own
``convert_wan_transformer_to_diffusers``, which must load strictly into a ``WanTransformer3DModel``. Then:

- a diffusers/PEFT LoRA saved by ``WanPipeline.save_lora_weights`` and fused by diffusers merges into the original
  file, and the merged file converted by diffusers equals diffusers' fused weights;
- a Wan distill / CausVid / LightX2V style file (``diffusion_model.`` names mixing ``lora_A``/``lora_B`` with
  ``.diff_b`` on biases, ``.diff`` on norms and ``.diff_m`` on the modulations) merges into the diffusers folder
  and into the original file, against the original checkpoint with the updates added and converted by diffusers,
  and against diffusers' own loader for what that loader keeps (it drops norm differences).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.names import layout_of

diffusers = pytest.importorskip("diffusers")
from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402
from diffusers.loaders import lora_conversion_utils  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402
from diffusion_oracle import assert_same, random_state  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
HEADS, HEAD_DIM = 2, 8
H = HEADS * HEAD_DIM
IN, OUT, TEXT, FREQ, FFN, IMAGE = 4, 4, 12, 16, 32, 10
PATCH = (1, 2, 2)
CONFIG = dict(
    patch_size=PATCH,
    num_attention_heads=HEADS,
    attention_head_dim=HEAD_DIM,
    in_channels=IN,
    out_channels=OUT,
    text_dim=TEXT,
    freq_dim=FREQ,
    ffn_dim=FFN,
    num_layers=2,
    cross_attn_norm=True,
    image_dim=IMAGE,
    added_kv_proj_dim=H,
    rope_max_seq_len=32,
)
RANK, ALPHA = 4, 8.0


def original_shapes() -> dict[str, tuple[int, ...]]:
    """Wan original tensor names and shapes of the tiny I2V config."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    def norm(name: str, size: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (size,)
        if bias:
            shapes[f"{name}.bias"] = (size,)

    shapes["patch_embedding.weight"], shapes["patch_embedding.bias"] = (H, IN, *PATCH), (H,)
    linear("text_embedding.0", H, TEXT)
    linear("text_embedding.2", H, H)
    linear("time_embedding.0", H, FREQ)
    linear("time_embedding.2", H, H)
    linear("time_projection.1", 6 * H, H)
    norm("img_emb.proj.0", IMAGE)
    linear("img_emb.proj.1", IMAGE, IMAGE)
    linear("img_emb.proj.3", H, IMAGE)
    norm("img_emb.proj.4", H)
    for i in range(2):
        b = f"blocks.{i}"
        shapes[f"{b}.modulation"] = (1, 6, H)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                linear(f"{b}.{attn}.{proj}", H, H)
            norm(f"{b}.{attn}.norm_q", H, bias=False)
            norm(f"{b}.{attn}.norm_k", H, bias=False)
        linear(f"{b}.cross_attn.k_img", H, H)
        linear(f"{b}.cross_attn.v_img", H, H)
        norm(f"{b}.cross_attn.norm_k_img", H, bias=False)
        norm(f"{b}.norm3", H)
        linear(f"{b}.ffn.0", FFN, H)
        linear(f"{b}.ffn.2", H, FFN)
    linear("head.head", OUT * int(np.prod(PATCH)), H)
    shapes["head.modulation"] = (1, 2, H)
    return shapes


def random_original(seed: int = 0) -> dict[str, np.ndarray]:
    return random_state(original_shapes(), seed)


def converted(original: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """diffusers' conversion of a Wan original state dict (a ``model.diffusion_model.`` prefix dropped by it)."""
    return convert_wan_transformer_to_diffusers({k: torch.from_numpy(np.array(v)) for k, v in original.items()})


def diffusers_model(original: dict[str, np.ndarray]) -> WanTransformer3DModel:
    model = WanTransformer3DModel(**CONFIG)
    model.load_state_dict(converted(original), strict=True)  # the converted names and shapes are exactly the model's
    return model


def fused(model: WanTransformer3DModel, state, metadata=None) -> dict[str, torch.Tensor]:
    """diffusers' merge: ``state`` loaded into ``model`` as a LoRA, fused, and the LoRA layers removed."""
    model.load_lora_adapter(state, prefix="transformer", adapter_name="a", metadata=metadata)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def original():
    return random_original()


# --- diffusers / PEFT LoRA -> Wan original checkpoint -------------------------------------------------------------

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "net.0.proj", "net.2", "proj_out"]
TARGETS += ["linear_1", "linear_2", "time_proj"]


def diffusers_lora(original: dict[str, np.ndarray], folder) -> str:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = diffusers_model(original)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    layers = get_peft_model_state_dict(model)
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_diffusers_wan_lora_into_original_checkpoint_matches_diffusers(original, prefix, tmp_path):
    base = tmp_path / "wan2.1_i2v.safetensors"
    save_file({prefix + k: v for k, v in original.items()}, str(base))
    lora = diffusers_lora(original, tmp_path / "lora")
    state, metadata = WanPipeline.lora_state_dict(lora, return_lora_metadata=True)
    want = fused(diffusers_model(original), state, metadata)

    out = tmp_path / "merged.safetensors"
    report = lorafuse.merge(base, [lora], out, dtype="fp32")
    merged = load_file(str(out))
    assert set(merged) == {prefix + k for k in original}
    assert_same(converted(merged), want)
    modules = len({k.rsplit(".lora_", 1)[0] for k in state})
    assert report.adapters[0]["parts"] == {"UNet/transformer": {"merged": modules, "skipped": 0}}


# --- Wan distill / CausVid style (original names, diffusion_model.) -> diffusers folder and original file ----------

LORA_MODULES = (
    "blocks.0.self_attn.q",
    "blocks.1.self_attn.o",
    "blocks.0.cross_attn.k",
    "blocks.1.cross_attn.k_img",
    "blocks.0.ffn.0",
    "blocks.1.ffn.2",
)
BIAS_DIFFS = ("blocks.0.self_attn.q", "blocks.1.cross_attn.v_img", "blocks.0.ffn.2")
NORM_DIFFS = ("blocks.0.norm3", "blocks.1.self_attn.norm_q", "blocks.0.cross_attn.norm_k_img")
MODULATION_DIFFS = ("blocks.1", "head")


def distill_lora(path, with_norms: bool = True, seed: int = 4) -> dict[str, np.ndarray]:
    """A file as Wan distill / CausVid LoRAs are saved: ``diffusion_model.<original name>`` with lora_A/lora_B and
    alpha, ``.diff_b`` bias differences, ``.diff`` norm differences and ``.diff_m`` modulation differences."""
    rng = np.random.default_rng(seed)
    shapes = original_shapes()
    tensors = {}
    for module in LORA_MODULES:
        out, inp = shapes[f"{module}.weight"]
        key = f"diffusion_model.{module}"
        tensors[f"{key}.lora_A.weight"] = (0.3 * rng.standard_normal((RANK, inp))).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (0.3 * rng.standard_normal((out, RANK))).astype(np.float32)
        tensors[f"{key}.alpha"] = np.array(ALPHA, np.float32)
    for module in BIAS_DIFFS:
        tensors[f"diffusion_model.{module}.diff_b"] = rng.standard_normal(shapes[f"{module}.bias"]).astype(np.float32)
    for module in NORM_DIFFS if with_norms else ():
        tensors[f"diffusion_model.{module}.diff"] = rng.standard_normal(shapes[f"{module}.weight"]).astype(np.float32)
    for module in MODULATION_DIFFS if with_norms else ():
        tensors[f"diffusion_model.{module}.diff_m"] = rng.standard_normal(shapes[f"{module}.modulation"]).astype(
            np.float32
        )
    save_file(tensors, str(path))
    return tensors


def added(original: dict[str, np.ndarray], tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original checkpoint with every update of the file added (alpha / rank * B @ A, and the differences)."""
    result = dict(original)
    for key, value in tensors.items():
        name = key.removeprefix("diffusion_model.")
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            scale = float(tensors[f"diffusion_model.{module}.alpha"]) / RANK
            up = tensors[f"diffusion_model.{module}.lora_B.weight"]
            result[f"{module}.weight"] = result[f"{module}.weight"] + scale * (up @ value)
        for suffix, attr in ((".diff_b", "bias"), (".diff_m", "modulation"), (".diff", "weight")):
            if name.endswith(suffix):
                target = f"{name.removesuffix(suffix)}.{attr}"
                result[target] = result[target] + value
    return result


def test_distill_lora_into_diffusers_folder_matches_diffusers_conversion(original, tmp_path):
    folder = tmp_path / "transformer"
    diffusers_model(original).save_pretrained(folder)
    tensors = distill_lora(tmp_path / "causvid.safetensors")
    out = tmp_path / "merged"
    lorafuse.merge(folder, [tmp_path / "causvid.safetensors"], out, dtype="fp32")
    got = {k: torch.from_numpy(v) for k, v in load_file(str(out / "diffusion_pytorch_model.safetensors")).items()}
    assert_same(got, converted(added(original, tensors)))


def test_distill_lora_into_diffusers_folder_matches_diffusers_loader(original, tmp_path):
    """diffusers' own loader for such files (``_convert_non_diffusers_wan_lora_to_diffusers``: diff_b as
    lora_B.bias) + fuse_lora, on a file without the norm and modulation differences that loader drops."""
    folder = tmp_path / "transformer"
    diffusers_model(original).save_pretrained(folder)
    distill_lora(tmp_path / "causvid.safetensors", with_norms=False)
    from safetensors.torch import load_file as load_torch

    state = lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers(
        load_torch(str(tmp_path / "causvid.safetensors"))
    )
    want = fused(diffusers_model(original), state)
    out = tmp_path / "merged"
    lorafuse.merge(folder, [tmp_path / "causvid.safetensors"], out, dtype="fp32")
    got = {k: torch.from_numpy(v) for k, v in load_file(str(out / "diffusion_pytorch_model.safetensors")).items()}
    assert_same(got, want)


def test_distill_lora_into_original_checkpoint(original, tmp_path):
    base = tmp_path / "wan.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in original.items()}, str(base))
    tensors = distill_lora(tmp_path / "causvid.safetensors")
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(base, [tmp_path / "causvid.safetensors"], out, dtype="fp32")
    merged = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(out)).items()}
    want = added(original, tensors)
    for key, value in want.items():
        np.testing.assert_allclose(merged[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_wan_layouts_are_detected(original):
    assert layout_of(original).name == "wan"
    assert layout_of({"model.diffusion_model." + k: v for k, v in original.items()}).name == "wan"
    assert layout_of({k: tuple(v.shape) for k, v in converted(original).items()}).name == "wan-diffusers"


def test_musubi_wan_lora_into_diffusers_folder_matches_diffusers_loader(original, tmp_path):
    """musubi-tuner's Wan LoRAs (kohya names of the original modules: ``lora_unet_blocks_0_self_attn_q``) merge
    into a diffusers folder, as ``WanPipeline.lora_state_dict`` converts them + fuse_lora."""
    rng = np.random.default_rng(9)
    shapes = original_shapes()
    tensors = {}
    for i in range(2):
        modules = [f"blocks.{i}.{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o")]
        modules += [f"blocks.{i}.cross_attn.k_img", f"blocks.{i}.cross_attn.v_img", f"blocks.{i}.ffn.0"]
        modules += [f"blocks.{i}.ffn.2"]
        for module in modules:
            out, inp = shapes[f"{module}.weight"]
            flat = "lora_unet_" + module.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = (0.3 * rng.standard_normal((RANK, inp))).astype(np.float32)
            tensors[f"{flat}.lora_up.weight"] = (0.3 * rng.standard_normal((out, RANK))).astype(np.float32)
            tensors[f"{flat}.alpha"] = np.array(ALPHA, np.float32)
    lora = tmp_path / "musubi_wan.safetensors"
    save_file(tensors, str(lora))
    state = WanPipeline.lora_state_dict(str(lora))
    want = fused(diffusers_model(original), state)

    folder = tmp_path / "transformer"
    diffusers_model(original).save_pretrained(folder)
    report = lorafuse.merge(folder, [lora], tmp_path / "merged", dtype="fp32")
    merged = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    assert_same({k: torch.from_numpy(v) for k, v in merged.items()}, want)
    assert report.adapters[0]["parts"] == {"UNet/transformer": {"merged": len(tensors) // 3, "skipped": 0}}
