"""Flux LoRAs across Flux's two layouts, against diffusers as the oracle.

A tiny random checkpoint in BFL's layout (fused ``qkv``, ``linear1``) is converted to diffusers' layout with
diffusers' own single-file converter (its hard-coded 3072 hidden size set to the tiny model's), which must load
strictly into a ``FluxTransformer2DModel``. Then:

- a diffusers/PEFT LoRA (separate q, k, v, ``proj_mlp``, ``norm_out``) saved by ``FluxPipeline.save_lora_weights``
  is fused by diffusers (``load_lora_adapter`` + ``fuse_lora``); lorafuse merges it into the BFL file, and the
  merged file converted by diffusers must equal diffusers' fused weights;
- a BFL-named LoRA (kohya / musubi-tuner ``lora_unet_double_blocks_...``, ``diffusion_model.`` files) merges into
  the diffusers folder: its rows split onto ``to_q``/``to_k``/``to_v``, and the result must equal diffusers'
  conversion of the BFL checkpoint with the update added, and diffusers' own kohya loader fused.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import lorafuse
import lorafuse.formats
from lorafuse.errors import LorafuseError
from lorafuse.names import layout_of

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import lora_conversion_utils, single_file_utils  # noqa: E402
from diffusion_oracle import assert_same, random_state  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
HEADS, HEAD_DIM = 2, 8
H = HEADS * HEAD_DIM
MLP = 4 * H
IN, JOINT, POOLED, TIME = 8, 12, 10, 256
CONFIG = dict(
    patch_size=1,
    in_channels=IN,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=HEAD_DIM,
    num_attention_heads=HEADS,
    joint_attention_dim=JOINT,
    pooled_projection_dim=POOLED,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
RANK, ALPHA = 4, 8.0


def _patched(function, replacements: dict[str, str]):
    """diffusers' ``function`` with its hard-coded full-size dimensions replaced by the tiny model's."""
    source = inspect.getsource(function)
    for old, new in replacements.items():
        assert old in source, f"diffusers changed {function.__name__}: {old!r} is gone"
        source = source.replace(old, new)
    namespace = dict(vars(inspect.getmodule(function)))
    exec(compile(source, inspect.getsourcefile(function), "exec"), namespace)
    return namespace[function.__name__]


to_diffusers = _patched(
    single_file_utils.convert_flux_transformer_checkpoint_to_diffusers, {"inner_dim = 3072": f"inner_dim = {H}"}
)


def bfl_shapes() -> dict[str, tuple[int, ...]]:
    """BFL Flux tensor names and shapes of the tiny config (2 double blocks, 2 single blocks, guidance)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    for name, inp in (("time_in", TIME), ("vector_in", POOLED), ("guidance_in", TIME)):
        linear(f"{name}.in_layer", H, inp)
        linear(f"{name}.out_layer", H, H)
    linear("txt_in", H, JOINT)
    linear("img_in", H, IN)
    for i in range(2):
        d = f"double_blocks.{i}"
        for side in ("img", "txt"):
            linear(f"{d}.{side}_mod.lin", 6 * H, H)
            linear(f"{d}.{side}_attn.qkv", 3 * H, H)
            linear(f"{d}.{side}_attn.proj", H, H)
            linear(f"{d}.{side}_mlp.0", MLP, H)
            linear(f"{d}.{side}_mlp.2", H, MLP)
            shapes[f"{d}.{side}_attn.norm.query_norm.scale"] = (HEAD_DIM,)
            shapes[f"{d}.{side}_attn.norm.key_norm.scale"] = (HEAD_DIM,)
        s = f"single_blocks.{i}"
        linear(f"{s}.modulation.lin", 3 * H, H)
        linear(f"{s}.linear1", 3 * H + MLP, H)
        linear(f"{s}.linear2", H, H + MLP)
        shapes[f"{s}.norm.query_norm.scale"] = (HEAD_DIM,)
        shapes[f"{s}.norm.key_norm.scale"] = (HEAD_DIM,)
    linear("final_layer.linear", IN, H)
    linear("final_layer.adaLN_modulation.1", 2 * H, H)
    return shapes


def random_bfl(seed: int = 0) -> dict[str, np.ndarray]:
    return random_state(bfl_shapes(), seed)


def converted(bfl: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """diffusers' conversion of a BFL state dict (any ``model.diffusion_model.`` prefix dropped by it)."""
    return to_diffusers({k: torch.from_numpy(np.array(v)) for k, v in bfl.items()})


def diffusers_model(bfl: dict[str, np.ndarray]) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(**CONFIG)
    model.load_state_dict(converted(bfl), strict=True)  # the converted names and shapes are exactly the model's
    return model


@pytest.fixture(scope="module")
def bfl():
    return random_bfl()


# --- diffusers / PEFT LoRA -> BFL checkpoint --------------------------------------------------------------------

TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_out.0",
    "to_add_out",
    "proj_mlp",
    "proj_out",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "norm_out.linear",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "x_embedder",
    "context_embedder",
    "linear_1",
    "linear_2",
]


def diffusers_lora(bfl: dict[str, np.ndarray], folder) -> tuple[str, int]:
    """A random diffusers Flux LoRA on every linear layer, saved by ``FluxPipeline.save_lora_weights`` (with its
    alpha in the file's metadata, diffusers 0.34+); the file and the number of LoRA modules."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = diffusers_model(bfl)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    layers = get_peft_model_state_dict(model)
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    return str(folder / "pytorch_lora_weights.safetensors"), len(layers) // 2


def diffusers_fused(bfl: dict[str, np.ndarray], lora: str) -> dict[str, torch.Tensor]:
    """diffusers' own merge, as ``FluxPipeline.load_lora_weights`` + ``fuse_lora`` do it: the file's state dict and
    metadata (its alpha) loaded into the model, fused, and the LoRA layers removed."""
    state, metadata = FluxPipeline.lora_state_dict(lora, return_lora_metadata=True)
    assert metadata["transformer.lora_alpha"] == ALPHA
    model = diffusers_model(bfl)
    model.load_lora_adapter(state, prefix="transformer", adapter_name="a", metadata=metadata)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_diffusers_lora_into_bfl_checkpoint_matches_diffusers(bfl, prefix, tmp_path):
    base = tmp_path / "flux1-dev.safetensors"
    save_file({prefix + k: v for k, v in bfl.items()}, str(base))
    lora, modules = diffusers_lora(bfl, tmp_path / "lora")
    want = diffusers_fused(bfl, lora)

    out = tmp_path / "merged.safetensors"
    report = lorafuse.merge(base, [lora], out, dtype="fp32")
    merged = load_file(str(out))
    assert set(merged) == {prefix + k for k in bfl}
    assert_same(converted(merged), want)
    # every module merged and is counted once (q, k and v are three modules, though one BFL tensor)
    assert report.adapters[0]["parts"] == {"UNet/transformer": {"merged": modules, "skipped": 0}}
    # the LoRA did change the fused tensors, in the rows of each piece
    for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"):
        assert not np.allclose(merged[prefix + name], bfl[name])


def test_diffusers_lora_halves_swap_on_final_adaln(bfl, tmp_path):
    """diffusers' norm_out.linear is BFL's final adaLN with its (shift, scale) halves swapped: a LoRA on the first
    half of one is a LoRA on the second half of the other."""
    base = tmp_path / "flux.safetensors"
    save_file(bfl, str(base))
    rng = np.random.default_rng(3)
    up = np.zeros((2 * H, RANK), np.float32)
    up[:H] = rng.standard_normal((H, RANK))  # diffusers' first half: scale
    down = rng.standard_normal((RANK, H)).astype(np.float32)
    lora = tmp_path / "norm_out.safetensors"
    save_file(
        {"transformer.norm_out.linear.lora_A.weight": down, "transformer.norm_out.linear.lora_B.weight": up}, str(lora)
    )
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(base, [lora], out, dtype="fp32")
    merged = load_file(str(out))["final_layer.adaLN_modulation.1.weight"]
    before = bfl["final_layer.adaLN_modulation.1.weight"]
    np.testing.assert_allclose(merged[:H], before[:H])  # BFL's shift rows: unchanged
    np.testing.assert_allclose(merged[H:], before[H:] + up[:H] @ down, rtol=1e-5, atol=1e-6)


def test_kohya_named_diffusers_modules_into_bfl_checkpoint(bfl, tmp_path):
    """kohya-style flattened diffusers names (``lora_transformer_single_transformer_blocks_0_attn_to_k``) merge into
    the BFL rows they name, as diffusers' conversion of the checkpoint places them."""
    base = tmp_path / "flux.safetensors"
    save_file(bfl, str(base))
    rng = np.random.default_rng(13)
    modules = {"single_transformer_blocks.0.attn.to_k": (H, H), "single_transformer_blocks.1.proj_mlp": (MLP, H)}
    modules["norm_out.linear"] = (2 * H, H)
    tensors, want = {}, converted(bfl)
    for module, (out, inp) in modules.items():
        flat = "lora_transformer_" + module.replace(".", "_")
        up = rng.standard_normal((out, RANK)).astype(np.float32)
        down = rng.standard_normal((RANK, inp)).astype(np.float32)
        tensors |= {f"{flat}.lora_up.weight": up, f"{flat}.lora_down.weight": down, f"{flat}.alpha": np.array(2.0)}
        want[f"{module}.weight"] = want[f"{module}.weight"] + torch.from_numpy((2.0 / RANK) * (up @ down))
    lora = tmp_path / "kohya_diffusers_names.safetensors"
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(lora))
    lorafuse.merge(base, [lora], tmp_path / "merged.safetensors", dtype="fp32")
    assert_same(converted(load_file(str(tmp_path / "merged.safetensors"))), want)


# --- BFL-named LoRA -> diffusers folder ---------------------------------------------------------------------------

KOHYA_MODULES = (
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.1.txt_mlp.0",
    "double_blocks.0.img_mod.lin",
    "single_blocks.0.linear1",
    "single_blocks.1.linear2",
    "single_blocks.1.modulation.lin",
    "img_in",
    "time_in.out_layer",
    "guidance_in.in_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)
# diffusers' kohya Flux loader drops final_layer's alphas (scale 1): give those alpha = rank, where both agree.
FINAL_ALPHA = float(RANK)


def kohya_lora(path, modules=KOHYA_MODULES, seed: int = 5) -> dict[str, np.ndarray]:
    """A kohya / musubi-tuner Flux LoRA (``lora_unet_<BFL module, flattened>``) with alphas; its tensors."""
    rng = np.random.default_rng(seed)
    shapes = bfl_shapes()
    tensors = {}
    for module in modules:
        out, inp = shapes[f"{module}.weight"]
        flat = "lora_unet_" + module.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = (0.3 * rng.standard_normal((RANK, inp))).astype(np.float32)
        tensors[f"{flat}.lora_up.weight"] = (0.3 * rng.standard_normal((out, RANK))).astype(np.float32)
        tensors[f"{flat}.alpha"] = np.array(FINAL_ALPHA if module.startswith("final_layer") else ALPHA, np.float32)
    save_file(tensors, str(path))
    return tensors


def added(bfl: dict[str, np.ndarray], tensors: dict[str, np.ndarray], modules=KOHYA_MODULES) -> dict[str, np.ndarray]:
    """The BFL checkpoint with each kohya module's alpha / rank * up @ down added (kohya's merge)."""
    result = dict(bfl)
    for module in modules:
        flat = "lora_unet_" + module.replace(".", "_")
        up, down = tensors[f"{flat}.lora_up.weight"], tensors[f"{flat}.lora_down.weight"]
        scale = float(tensors[f"{flat}.alpha"]) / RANK
        result[f"{module}.weight"] = bfl[f"{module}.weight"] + scale * (up @ down)
    return result


def diffusers_folder(bfl, folder):
    diffusers_model(bfl).save_pretrained(folder)
    return folder


def merged_folder(out) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in load_file(str(out / "diffusion_pytorch_model.safetensors")).items()}


def test_kohya_flux_lora_into_diffusers_folder_matches_diffusers_conversion(bfl, tmp_path):
    folder = diffusers_folder(bfl, tmp_path / "transformer")
    tensors = kohya_lora(tmp_path / "kohya_flux.safetensors")
    out = tmp_path / "merged"
    report = lorafuse.merge(folder, [tmp_path / "kohya_flux.safetensors"], out, dtype="fp32")
    assert_same(merged_folder(out), converted(added(bfl, tensors)))
    assert report.adapters[0]["parts"] == {"UNet/transformer": {"merged": len(KOHYA_MODULES), "skipped": 0}}


def test_kohya_flux_lora_into_diffusers_folder_matches_diffusers_kohya_loader(bfl, tmp_path):
    """diffusers' own kohya Flux loader (its hard-coded linear1 split set to the tiny model's) + fuse_lora."""
    folder = diffusers_folder(bfl, tmp_path / "transformer")
    kohya_lora(tmp_path / "kohya_flux.safetensors")
    convert = _patched(
        lora_conversion_utils._convert_kohya_flux_lora_to_diffusers,
        {"dims=[3072, 3072, 3072, 12288]": f"dims=[{H}, {H}, {H}, {MLP}]"},
    )
    from safetensors.torch import load_file as load_torch

    state = convert(load_torch(str(tmp_path / "kohya_flux.safetensors")))
    # diffusers names img_in/time_in/guidance_in/final_layer's LoRAs without the transformer. prefix its loader
    # filters on (so a pipeline would drop them); put it on, so the whole file is compared
    state = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state.items()}
    model = diffusers_model(bfl)
    model.load_lora_adapter(state, prefix="transformer", adapter_name="k")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    want = {k: v.detach() for k, v in model.state_dict().items()}

    out = tmp_path / "merged"
    lorafuse.merge(folder, [tmp_path / "kohya_flux.safetensors"], out, dtype="fp32")
    assert_same(merged_folder(out), want)


def test_diffusion_model_prefixed_bfl_lora_into_diffusers_folder(bfl, tmp_path):
    """The ``diffusion_model.`` layout (ComfyUI-style) with BFL names: a LoRA and a ``.diff_b`` on a fused qkv (the
    bias's rows split onto to_q/to_k/to_v.bias), a full ``.diff`` on an MLP weight."""
    folder = diffusers_folder(bfl, tmp_path / "transformer")
    rng = np.random.default_rng(7)
    up = rng.standard_normal((3 * H, RANK)).astype(np.float32)
    down = rng.standard_normal((RANK, H)).astype(np.float32)
    diff_b = rng.standard_normal(3 * H).astype(np.float32)
    diff = rng.standard_normal((MLP, H)).astype(np.float32)
    lora = tmp_path / "comfy.safetensors"
    save_file(
        {
            "diffusion_model.double_blocks.1.img_attn.qkv.lora_up.weight": up,
            "diffusion_model.double_blocks.1.img_attn.qkv.lora_down.weight": down,
            "diffusion_model.double_blocks.1.img_attn.qkv.diff_b": diff_b,
            "diffusion_model.double_blocks.0.txt_mlp.0.diff": diff,
        },
        str(lora),
    )
    want = dict(bfl)
    want["double_blocks.1.img_attn.qkv.weight"] = bfl["double_blocks.1.img_attn.qkv.weight"] + up @ down
    want["double_blocks.1.img_attn.qkv.bias"] = bfl["double_blocks.1.img_attn.qkv.bias"] + diff_b
    want["double_blocks.0.txt_mlp.0.weight"] = bfl["double_blocks.0.txt_mlp.0.weight"] + diff
    out = tmp_path / "merged"
    lorafuse.merge(folder, [lora], out, dtype="fp32")
    assert_same(merged_folder(out), converted(want))


# --- XLabs Flux LoRA -> BFL checkpoint and diffusers folder -------------------------------------------------------


def xlabs_lora(path, prefix: str = "") -> None:
    """An XLabs Flux LoRA: processor.qkv_lora1/proj_lora1 (image), qkv_lora2/proj_lora2 (text) in double blocks,
    qkv_lora/proj_lora in single blocks; no alpha."""
    rng = np.random.default_rng(11)
    tensors = {}

    def lora(name: str, out: int, inp: int) -> None:
        tensors[f"{prefix}{name}.down.weight"] = (0.3 * rng.standard_normal((RANK, inp))).astype(np.float32)
        tensors[f"{prefix}{name}.up.weight"] = (0.3 * rng.standard_normal((out, RANK))).astype(np.float32)

    for i in range(2):
        for stream in ("1", "2"):
            lora(f"double_blocks.{i}.processor.qkv_lora{stream}", 3 * H, H)
            lora(f"double_blocks.{i}.processor.proj_lora{stream}", H, H)
        lora(f"single_blocks.{i}.processor.qkv_lora", 3 * H, H)
        lora(f"single_blocks.{i}.processor.proj_lora", H, H + MLP)
    save_file(tensors, str(path))


def xlabs_fused(bfl, path) -> dict[str, torch.Tensor]:
    """diffusers' XLabs loader (``_convert_xlabs_flux_lora_to_diffusers``, scale 1) + fuse_lora."""
    from safetensors.torch import load_file as load_torch

    state = lora_conversion_utils._convert_xlabs_flux_lora_to_diffusers(load_torch(str(path)))
    model = diffusers_model(bfl)
    model.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_lora_matches_diffusers_into_bfl_and_diffusers(bfl, prefix, tmp_path):
    lora = tmp_path / "xlabs.safetensors"
    xlabs_lora(lora, prefix)
    assert lorafuse.formats.detect_format(lora) == "xlabs"
    want = xlabs_fused(bfl, lora)

    base = tmp_path / "flux.safetensors"
    save_file(bfl, str(base))
    lorafuse.merge(base, [lora], tmp_path / "merged.safetensors", dtype="fp32")
    assert_same(converted(load_file(str(tmp_path / "merged.safetensors"))), want)

    folder = diffusers_folder(bfl, tmp_path / "transformer")
    lorafuse.merge(folder, [lora], tmp_path / "merged", dtype="fp32")
    assert_same(merged_folder(tmp_path / "merged"), want)


# --- layout detection and refusals -------------------------------------------------------------------------------


def test_layouts_are_detected_from_the_checkpoint_names(bfl):
    assert layout_of(bfl).name == "flux-bfl"
    assert layout_of({"model.diffusion_model." + k: v for k, v in bfl.items()}).name == "flux-bfl"
    assert layout_of({k: tuple(v.shape) for k, v in converted(bfl).items()}).name == "flux-diffusers"
    assert layout_of(["model.layers.0.self_attn.q_proj.weight"]).name == "generic"


def test_fused_tensor_of_wrong_size_is_refused(bfl, tmp_path):
    """A BFL checkpoint whose qkv does not split into three equal row blocks is refused, not merged off-by-rows."""
    broken = dict(bfl)
    broken["double_blocks.0.img_attn.qkv.weight"] = np.zeros((3 * H + 1, H), np.float32)
    broken["double_blocks.0.img_attn.qkv.bias"] = np.zeros(3 * H + 1, np.float32)
    base = tmp_path / "broken.safetensors"
    save_file(broken, str(base))
    lora = tmp_path / "q.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((RANK, H), np.float32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((H, RANK), np.float32),
        },
        str(lora),
    )
    with pytest.raises(LorafuseError, match="cannot hold the 3 row blocks"):
        lorafuse.merge(base, [lora], tmp_path / "out.safetensors", dtype="fp32")


def test_unmapped_diffusers_names_are_refused_even_with_allow_unmatched(bfl, tmp_path):
    """A diffusers LoRA whose names the tables do not know (here: a misspelt module) matches nothing in the BFL
    checkpoint: the part is refused, --allow-unmatched or not."""
    base = tmp_path / "flux.safetensors"
    save_file(bfl, str(base))
    lora = tmp_path / "odd.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_qq.lora_A.weight": np.ones((RANK, H), np.float32),
            "transformer.transformer_blocks.0.attn.to_qq.lora_B.weight": np.ones((H, RANK), np.float32),
        },
        str(lora),
    )
    for allow in (False, True):
        with pytest.raises(LorafuseError):
            lorafuse.merge(base, [lora], tmp_path / f"out{allow}.safetensors", dtype="fp32", allow_unmatched=allow)
