"""Single-file diffusion checkpoints: fp8 bases (plain fp8 casts and ComfyUI's scaled fp8, quantized.py) and the
base file's ``__metadata__`` (modelspec keys) kept in the output.

The oracle: diffusers' ``load_lora_weights``-path ``fuse_lora`` of a kohya LoRA into the base's dequantized UNet (the
values the fp8 file stands for, ComfyUI's rule ``fp8 * scale_weight``), then ComfyUI's per-tensor scale (absolute
maximum / largest fp8 value) and torch's fp8 rounding of the merged weight divided by it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import DtypeOverflowError, LorafuseError

pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from test_diffusion_pipeline import kohya_lora, tiny_pipeline  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
UNET_FILE = "diffusion_pytorch_model.safetensors"


def is_scaled(name: str, tensor: torch.Tensor) -> bool:
    """ComfyUI's scaled fp8 stores the Linear weights in fp8 (its scaled_fp8_ops replace Linear only)."""
    return name.endswith(".weight") and tensor.ndim == 2


def comfy_scaled_fp8(weights: dict[str, torch.Tensor], fp8: torch.dtype, scaled: bool = True) -> dict:
    """The tensors of an fp8 file made from fp32 ``weights``: Linear weights in ``fp8`` (with ``scale_weight``
    and the ``scaled_fp8`` marker when ``scaled``), everything else fp16."""
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if not is_scaled(name, w):
            out[name] = w.to(torch.float16)
            continue
        if scaled:
            scale = (w.abs().max() / FP8_MAX[fp8]).to(torch.float32)
            out[name] = (w / scale).to(fp8)
            out[name.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            out[name] = w.to(fp8)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an fp8 file stands for, in fp32 (ComfyUI: fp8 values times their scale_weight)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".scale_weight", "scaled_fp8")):
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".scale_weight")
        out[name] = t.to(torch.float32) * (scale if scale is not None else 1.0)
    return out


def fused_unet(unet_folder: Path, weights: dict[str, torch.Tensor], lora: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """diffusers' merge of ``lora`` into the UNet of ``unet_folder``'s config holding ``weights`` (fp32)."""
    folder = tmp / "oracle_unet"
    shutil.copytree(unet_folder, folder)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / UNET_FILE)
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(lora))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet)
    unet.fuse_lora()
    unet.unload_lora()
    return {k: v.detach() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fp8")
    pipe = tiny_pipeline(root)
    unet = pipe / "unet"
    weights = {k: v.float() for k, v in load_file(unet / UNET_FILE).items()}
    lora = kohya_lora(pipe, root / "kohya_unet.safetensors", parts=("unet",))
    return {"root": root, "unet": unet, "weights": weights, "lora": lora}


def write_base(sd: dict, tmp: Path, fp8: torch.dtype, scaled: bool = True, metadata: dict | None = None) -> Path:
    path = tmp / "base.safetensors"
    save_file(comfy_scaled_fp8(sd["weights"], fp8, scaled), path, metadata=metadata)
    return path


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_fp8_weight(name: str, stored: torch.Tensor, scale: torch.Tensor | None, want: torch.Tensor, fp8) -> None:
    """``stored`` (fp8) x ``scale`` is ``want`` rounded once in fp8 at ComfyUI's recomputed scale."""
    assert stored.dtype == fp8, name
    if scale is None:
        expect = want.to(fp8)
    else:
        new_scale = (want.abs().max() / FP8_MAX[fp8]).to(torch.float32)
        torch.testing.assert_close(scale.reshape(()), new_scale, rtol=1e-6, atol=0, msg=name)
        expect = (want / scale).to(fp8)
    same = (stored.view(torch.uint8) == expect.view(torch.uint8)).float().mean().item()
    # fp32 sums in another order may land a value on the other side of an fp8 rounding boundary, rarely
    assert same > 0.99, f"{name}: only {same:.1%} of the fp8 values are the oracle's"
    # and every value within one fp8 step of the merged value (a normal's step, or the smallest subnormal)
    unit = scale if scale is not None else torch.tensor(1.0)
    mantissa, subnormal = {E4M3: (3, 2.0**-9), E5M2: (2, 2.0**-16)}[fp8]
    step = torch.maximum(
        (want.abs() / unit).clamp(min=1e-30).log2().floor().exp2() / 2**mantissa, torch.tensor(subnormal)
    )
    assert ((stored.float() - want / unit).abs() <= step * 1.0001).all(), name


def test_scaled_fp8_merges_and_is_written_back_in_fp8_with_new_scales(sd, tmp_path):
    base = write_base(sd, tmp_path, E4M3)
    out = tmp_path / "merged.safetensors"
    report = lorafuse.merge(base, [sd["lora"]], out)
    merged, stored = load_file(out), load_file(base)
    assert set(merged) == set(stored) and merged["scaled_fp8"].dtype == E4M3
    want = fused_unet(sd["unet"], dequantized(stored), sd["lora"], tmp_path)
    touched = [k for k in stored if is_scaled(k, stored[k]) and not torch.equal(want[k], dequantized(stored)[k])]
    assert len(touched) == report.tensors_touched > 0
    for name in stored:
        scale_name = name.removesuffix(".weight") + ".scale_weight"
        if name in touched:
            assert_fp8_weight(name, merged[name], merged[scale_name], want[name], E4M3)
            assert not torch.equal(merged[scale_name], stored[scale_name])  # recomputed from the merged values
        elif not name.endswith(".scale_weight") or name.removesuffix(".scale_weight") + ".weight" not in touched:
            assert same_bytes(merged[name], stored[name]), name


def test_scaled_fp8_into_bf16_dequantizes_every_weight_and_drops_the_scales(sd, tmp_path):
    base = write_base(sd, tmp_path, E4M3)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(base), str(sd["lora"]), "-o", str(out), "--dtype", "bf16", "-q"]) == 0
    merged, stored = load_file(out), load_file(base)
    assert not any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in merged)
    want = fused_unet(sd["unet"], dequantized(stored), sd["lora"], tmp_path)
    assert set(merged) == set(want)
    for name, value in merged.items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, want[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)


def test_e4m3_into_e5m2_rescales_every_scaled_weight(sd, tmp_path):
    base = write_base(sd, tmp_path, E4M3)
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(base, [sd["lora"]], out, dtype="fp8_e5m2")
    merged, stored = load_file(out), load_file(base)
    assert merged["scaled_fp8"].dtype == E5M2
    want = fused_unet(sd["unet"], dequantized(stored), sd["lora"], tmp_path)
    for name, value in stored.items():
        if is_scaled(name, value):
            scale = merged[name.removesuffix(".weight") + ".scale_weight"]
            assert_fp8_weight(name, merged[name], scale, want[name], E5M2)
        elif not name.endswith((".scale_weight", "scaled_fp8")):
            assert torch.equal(merged[name], value), name  # fp16 tensors keep their dtype and bytes


def test_unscaled_fp8_merges_back_into_fp8(sd, tmp_path):
    base = write_base(sd, tmp_path, E4M3, scaled=False)
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(base, [sd["lora"]], out)
    merged, stored = load_file(out), load_file(base)
    want = fused_unet(sd["unet"], dequantized(stored), sd["lora"], tmp_path)
    for name, value in stored.items():
        if value.dtype == E4M3 and not torch.equal(want[name], value.float()):
            assert_fp8_weight(name, merged[name], None, want[name], E4M3)
        else:
            assert same_bytes(merged[name], value), name


def test_an_unscaled_fp8_weight_pushed_past_the_fp8_range_is_refused(sd, tmp_path):
    base = write_base(sd, tmp_path, E4M3, scaled=False)
    loud = {k: v * 1e5 if k.endswith("lora_up.weight") else v for k, v in load_file(sd["lora"]).items()}
    save_file(loud, tmp_path / "loud.safetensors")
    with pytest.raises(DtypeOverflowError, match="float8_e4m3fn range"):
        lorafuse.merge(base, [tmp_path / "loud.safetensors"], tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_fp8_dtype_for_a_base_without_fp8_is_refused(sd, tmp_path):
    path = tmp_path / "fp16.safetensors"
    save_file({k: v.half() for k, v in sd["weights"].items()}, path)
    with pytest.raises(LorafuseError, match="holds no fp8 tensor"):
        lorafuse.merge(path, [sd["lora"]], tmp_path / "merged.safetensors", dtype="fp8_e4m3fn")
    with pytest.raises(LorafuseError, match="fp8_e4m3fn or fp8_e5m2"):
        lorafuse.merge(path, [sd["lora"]], tmp_path / "merged.safetensors", dtype="fp4")


def test_a_scale_that_is_not_one_f32_value_is_refused(sd, tmp_path):
    tensors = comfy_scaled_fp8(sd["weights"], E4M3)
    name = next(k for k in tensors if k.endswith(".scale_weight"))
    tensors[name] = tensors[name].reshape(1).repeat(2)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(LorafuseError, match="one F32 scale per fp8 weight"):
        lorafuse.merge(tmp_path / "bad.safetensors", [sd["lora"]], tmp_path / "merged.safetensors")


MODELSPEC = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1",
    "modelspec.title": "tiny",
    "format": "pt",
}


def test_the_base_files_metadata_is_kept_with_the_provenance_added(sd, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({k: v.half() for k, v in sd["weights"].items()}, base, metadata=MODELSPEC)
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(base, [sd["lora"]], out, weights=[0.5])
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert {k: metadata[k] for k in MODELSPEC} == MODELSPEC
    provenance = json.loads(metadata["lorafuse_merge"])
    assert provenance["adapters"][0]["weight"] == 0.5 and provenance["adapters"][0]["format"] == "kohya"


def test_fp8_metadata_is_kept_too(sd, tmp_path):
    base = write_base(sd, tmp_path, E4M3, metadata=MODELSPEC)
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(base, [sd["lora"]], out)
    with safe_open(out, "pt") as handle:
        assert {k: handle.metadata()[k] for k in MODELSPEC} == MODELSPEC


def test_merge_verify_recomputes_the_fp8_re_encoding(sd, tmp_path, capsys):
    base = write_base(sd, tmp_path, E4M3)
    out = tmp_path / "merged.safetensors"
    args = ["merge", str(base), str(sd["lora"]), "-o", str(out), "--verify", "--json"]
    assert main(args) == 0
    verdict = json.loads(capsys.readouterr().out)["verify"]
    assert verdict["passed"] is True
