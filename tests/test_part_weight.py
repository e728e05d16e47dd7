"""Per-part strengths (``--part-weight``, part_weights.py) against diffusers: ``fuse_lora`` of the UNet and of the
text encoder at their own scales (ComfyUI's strength_model / strength_clip) on a tiny SD pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.names.parts import DENOISER, TE1, TE2, TE3
from lorafuse.part_weights import factor, parse_part_weight, per_adapter

pytest.importorskip("diffusers")
from test_diffusion_pipeline import WEIGHT_FILES, assert_pipeline_merged, fused, kohya_lora, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    pipe = tiny_pipeline(root)
    return {"pipe": pipe, "lora": kohya_lora(pipe, root / "kohya.safetensors")}


def test_unet_and_text_encoder_strengths_as_diffusers_fuses_them(sd, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", str(sd["pipe"]), str(sd["lora"]), "-o", str(out), "--weight", "0.8", "--part-weight", "te=0.5"]
    assert main([*args, "--json"]) == 0
    assert_pipeline_merged(out, sd["pipe"], fused(sd["pipe"], sd["lora"], unet_scale=0.8, te_scale=0.4))
    provenance = json.loads((out / "lorafuse_merge.json").read_text())
    assert provenance["adapters"][0]["weight"] == 0.8
    assert provenance["adapters"][0]["part_weights"] == {"te1": 0.5, "te2": 0.5, "te3": 0.5}


def test_a_zero_text_encoder_strength_leaves_its_bytes_and_a_named_adapter_wins(sd, tmp_path):
    out = tmp_path / "merged"
    report = lorafuse.merge(sd["pipe"], [sd["lora"]], out, part_weights=["te=0.7", "1:te1=0", "unet=1.5"])
    merged, base = load_file(out / WEIGHT_FILES["text_encoder"]), load_file(sd["pipe"] / WEIGHT_FILES["text_encoder"])
    assert all(torch.equal(merged[k], base[k]) for k in base)
    want = fused(sd["pipe"], sd["lora"], unet_scale=1.5)["unet"]
    for name, value in load_file(out / WEIGHT_FILES["unet"]).items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert report.adapters[0]["part_weights"] == {"unet": 1.5, "te1": 0.0, "te2": 0.7, "te3": 0.7}


def test_the_api_takes_one_mapping_per_adapter(sd, tmp_path):
    out = tmp_path / "merged"
    lorafuse.merge(sd["pipe"], [sd["lora"]], out, weights=[0.8], part_weights=[{"clip": 0.5}])
    assert_pipeline_merged(out, sd["pipe"], fused(sd["pipe"], sd["lora"], unet_scale=0.8, te_scale=0.4))


def test_part_weights_of_a_single_file_output_are_in_its_metadata(sd, tmp_path):
    unet_lora = kohya_lora(sd["pipe"], tmp_path / "unet_lora.safetensors", parts=("unet",))
    out = tmp_path / "unet.safetensors"
    lorafuse.merge(sd["pipe"] / WEIGHT_FILES["unet"], [unet_lora], out, part_weights=["unet=0.25"])
    with safe_open(out, "np") as handle:
        merged = json.loads(handle.metadata()["lorafuse_merge"])
    assert merged["adapters"][0]["part_weights"] == {"unet": 0.25}
    want = fused(sd["pipe"], unet_lora, unet_scale=0.25)["unet"]
    for name, value in load_file(out).items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        (["te2=0.5"], "changes nothing"),  # the LoRA has no text encoder 2
        (["2:te=0.5"], "only 1 adapters"),
        (["te=0.5", "clip=0.3"], "give it once"),
        (["vae=0.5"], "not \\[N:\\]PART=W"),
        (["te=inf"], "not a finite number"),
        (["te=half"], "not a number"),
        (["0:te=1"], "numbered from 1"),
    ],
)
def test_bad_part_weights_are_one_line_errors(sd, tmp_path, specs, match):
    with pytest.raises(LorafuseError, match=match):
        lorafuse.merge(sd["pipe"], [sd["lora"]], tmp_path / "out", part_weights=specs)
    assert not (tmp_path / "out").exists()


def test_a_part_weight_on_an_update_whose_name_tells_no_part_is_refused():
    assert factor({}, "lora", "layer.lora_A.weight") == 1.0
    assert factor({TE1: 0.5}, "lora", "lora_te1_text_model_x") == 0.5
    assert factor({TE1: 0.5}, "lora", "lora_unet_x") == 1.0
    with pytest.raises(LorafuseError, match="names no part"):
        factor({TE1: 0.5}, "lora", "layer.lora_A.weight")


def test_the_most_specific_setting_wins():
    held = [{DENOISER, TE1, TE2}, {DENOISER}]
    specs = [parse_part_weight(s) for s in ("te=0.5", "te2=0.25", "2:unet=2", "unet=0.9")]
    assert per_adapter(specs, held) == [
        {TE1: 0.5, TE2: 0.25, TE3: 0.5, DENOISER: 0.9},
        {TE1: 0.5, TE2: 0.25, TE3: 0.5, DENOISER: 2.0},
    ]


def test_merge_verify_checks_the_part_weights(sd, tmp_path, capsys):
    unet_file = sd["pipe"] / WEIGHT_FILES["unet"]
    lora = kohya_lora(sd["pipe"], tmp_path / "unet_lora.safetensors", parts=("unet",))
    out = tmp_path / "merged.safetensors"
    args = ["merge", str(unet_file), str(lora), "-o", str(out), "--part-weight", "unet=0.25", "--verify", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["verify"]["passed"] is True


def test_verify_from_provenance_reads_the_part_weights(sd, tmp_path, capsys):
    lora = kohya_lora(sd["pipe"], tmp_path / "unet_lora.safetensors", parts=("unet",))
    out = tmp_path / "merged"
    assert main(["merge", str(sd["pipe"] / "unet"), str(lora), "-o", str(out), "--part-weight", "unet=0.25"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0  # base, adapter and its part weight from lorafuse_merge.json
    assert json.loads(capsys.readouterr().out)["passed"] is True
    # The same merge without the part weight is another model: the recorded weight is what verify checked.
    record = out / "lorafuse_merge.json"
    data = json.loads(record.read_text())
    data["adapters"][0].pop("part_weights")
    record.write_text(json.dumps(data))
    assert main(["verify", str(out), "--json"]) == 1
