"""kohya, diffusion-layout and plain lora_A/lora_B single files, built by hand, merged onto the right tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import AdapterError, LorafuseError, ShapeMismatchError
from lorafuse.formats import detect_format, read_adapter

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # 1x1 conv in the base
PROJ_OUT = "down_blocks.0.attentions.0.proj_out"  # Linear in the base, LoRA saved as 1x1 conv
CONV = "down_blocks.0.resnets.0.conv1"  # 3x3 conv
NORM = "down_blocks.0.resnets.0.norm1"
MOD = "blocks.0"  # a module with a .modulation parameter


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unet_like(prefix: str = "") -> dict[str, torch.Tensor]:
    g = _gen(0)
    shapes = {
        f"{Q}.weight": (16, 16),
        f"{Q}.bias": (16,),
        f"{PROJ_IN}.weight": (16, 8, 1, 1),
        f"{PROJ_OUT}.weight": (16, 16),
        f"{CONV}.weight": (8, 4, 3, 3),
        f"{CONV}.bias": (8,),
        f"{NORM}.weight": (4,),
        f"{NORM}.bias": (4,),
        f"{MOD}.modulation": (1, 6, 16),
        "time_embedding.linear_1.weight": (16, 8),
    }
    return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def save_base(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return folder


def pair(out: int, inp: int, rank: int, seed: int, kernel: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    down = torch.randn((rank, inp, *kernel), generator=g) * 0.3
    up = torch.randn((out, rank, *([1] * len(kernel))), generator=g) * 0.3
    return up, down


def lora_product(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def merged_tensors(tmp_path: Path, base: Path, adapter: Path, **kwargs) -> dict[str, torch.Tensor]:
    out = tmp_path / "merged"
    lorafuse.merge(base, [adapter], out, **kwargs)
    return load_file(out / "diffusion_pytorch_model.safetensors")


def test_kohya_linear_conv_and_alpha_map_onto_dotted_names(tmp_path):
    tensors = unet_like()
    base = save_base(tmp_path / "base", tensors)
    q_up, q_down = pair(16, 16, 4, 1)
    c_up, c_down = pair(8, 4, 2, 2, kernel=(3, 3))
    pi_up, pi_down = pair(16, 8, 2, 3, kernel=(1, 1))
    po_up, po_down = pair(16, 16, 2, 4, kernel=(1, 1))
    k = "lora_unet_"
    lora = {
        f"{k}{Q.replace('.', '_')}.lora_up.weight": q_up,
        f"{k}{Q.replace('.', '_')}.lora_down.weight": q_down,
        f"{k}{Q.replace('.', '_')}.alpha": torch.tensor(2.0),  # scale 2 / 4
        f"{k}{CONV.replace('.', '_')}.lora_up.weight": c_up,
        f"{k}{CONV.replace('.', '_')}.lora_down.weight": c_down,  # no alpha: scale 1
        f"{k}{PROJ_IN.replace('.', '_')}.lora_up.weight": pi_up,
        f"{k}{PROJ_IN.replace('.', '_')}.lora_down.weight": pi_down,
        f"{k}{PROJ_IN.replace('.', '_')}.alpha": torch.tensor(1.0),
        f"{k}{PROJ_OUT.replace('.', '_')}.lora_up.weight": po_up,
        f"{k}{PROJ_OUT.replace('.', '_')}.lora_down.weight": po_down,
    }
    save_file(lora, tmp_path / "kohya.safetensors")
    assert detect_format(tmp_path / "kohya.safetensors") == "kohya"

    merged = merged_tensors(tmp_path, base, tmp_path / "kohya.safetensors")
    expected = dict(tensors)
    expected[f"{Q}.weight"] = tensors[f"{Q}.weight"] + 0.5 * q_up @ q_down
    expected[f"{CONV}.weight"] = tensors[f"{CONV}.weight"] + lora_product(c_up, c_down, (8, 4, 3, 3))
    expected[f"{PROJ_IN}.weight"] = tensors[f"{PROJ_IN}.weight"] + 0.5 * lora_product(pi_up, pi_down, (16, 8, 1, 1))
    expected[f"{PROJ_OUT}.weight"] = tensors[f"{PROJ_OUT}.weight"] + lora_product(po_up, po_down, (16, 16))
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6, msg=name)
    changed = {n for n in expected if not torch.equal(expected[n], tensors[n])}
    assert changed == {f"{Q}.weight", f"{CONV}.weight", f"{PROJ_IN}.weight", f"{PROJ_OUT}.weight"}


def test_kohya_names_resolve_under_a_head_prefix_and_by_text_encoder_hint(tmp_path):
    # The base carries "unet." and two text encoders with the same inner names (SDXL-style).
    inner = "text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {f"unet.{Q}.weight": torch.zeros(16, 16)}
    tensors[f"text_encoder.{inner}.weight"] = torch.zeros(8, 8)
    tensors[f"text_encoder_2.{inner}.weight"] = torch.zeros(8, 8)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    up, down = pair(16, 16, 2, 5)
    t_up, t_down = pair(8, 8, 2, 6)
    flat = inner.replace(".", "_")
    lora = {
        f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": up,
        f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": down,
        f"lora_te2_{flat}.lora_up.weight": t_up,
        f"lora_te2_{flat}.lora_down.weight": t_down,
    }
    save_file(lora, tmp_path / "k.safetensors")
    adapter = read_adapter(tmp_path / "k.safetensors", base_shapes=shapes)
    assert adapter.fmt == "kohya"
    assert sorted(t.target for t in adapter.edits) == [f"text_encoder_2.{inner}.weight", f"unet.{Q}.weight"]

    # lora_te_ means the first text encoder; with two unrelated candidates it is an error naming the key.
    save_file(
        {f"lora_te_{flat}.lora_up.weight": t_up, f"lora_te_{flat}.lora_down.weight": t_down}, tmp_path / "a.safetensors"
    )
    adapter = read_adapter(tmp_path / "a.safetensors", base_shapes=shapes)
    assert [t.target for t in adapter.edits] == [f"text_encoder.{inner}.weight"]
    other = {f"a.{inner}.weight": (8, 8), f"b.{inner}.weight": (8, 8)}
    with pytest.raises(AdapterError, match=f"lora_te_{flat}.*a.{inner}"):
        read_adapter(tmp_path / "a.safetensors", base_shapes=other)


def test_kohya_unknown_name_is_an_error_naming_the_key(tmp_path):
    base = save_base(tmp_path / "base", unet_like())
    up, down = pair(16, 16, 2, 7)
    save_file(
        {"lora_unet_mid_block_nothing.lora_up.weight": up, "lora_unet_mid_block_nothing.lora_down.weight": down},
        tmp_path / "k.safetensors",
    )
    with pytest.raises(ShapeMismatchError, match="lora_unet_mid_block_nothing"):
        lorafuse.merge(base, [tmp_path / "k.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterError, match="base model"):
        read_adapter(tmp_path / "k.safetensors")  # no base: kohya names cannot be resolved


def test_diffusion_layout_lora_and_full_differences(tmp_path):
    tensors = unet_like()
    base = save_base(tmp_path / "base", tensors)
    up, down = pair(16, 16, 4, 8)
    c_up, c_down = pair(8, 4, 2, 9, kernel=(3, 3))
    g = _gen(10)
    diff_w = torch.randn(16, 8, generator=g)
    diff_b = torch.randn(8, generator=g)
    diff_m = torch.randn(1, 6, 16, generator=g)
    p = "diffusion_model."
    lora = {
        f"{p}{Q}.lora_up.weight": up,
        f"{p}{Q}.lora_down.weight": down,
        f"{p}{CONV}.lora_up.weight": c_up,
        f"{p}{CONV}.lora_down.weight": c_down,
        f"{p}{CONV}.alpha": torch.tensor(4.0),  # scale 4 / 2
        f"{p}time_embedding.linear_1.diff": diff_w,
        f"{p}{CONV}.diff_b": diff_b,
        f"{p}{MOD}.diff_m": diff_m,
    }
    save_file(lora, tmp_path / "lora.safetensors")
    assert detect_format(tmp_path / "lora.safetensors") == "diffusion"

    merged = merged_tensors(tmp_path, base, tmp_path / "lora.safetensors", weights=[0.5])
    expected = dict(tensors)
    expected[f"{Q}.weight"] = tensors[f"{Q}.weight"] + 0.5 * up @ down
    expected[f"{CONV}.weight"] = tensors[f"{CONV}.weight"] + 0.5 * 2 * lora_product(c_up, c_down, (8, 4, 3, 3))
    expected["time_embedding.linear_1.weight"] = tensors["time_embedding.linear_1.weight"] + 0.5 * diff_w
    expected[f"{CONV}.bias"] = tensors[f"{CONV}.bias"] + 0.5 * diff_b
    expected[f"{MOD}.modulation"] = tensors[f"{MOD}.modulation"] + 0.5 * diff_m
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_diffusion_layout_merges_into_a_prefixed_single_file_base(tmp_path):
    # A ComfyUI-style checkpoint whose names carry "model.diffusion_model.": the prefix is matched.
    tensors = unet_like(prefix="model.diffusion_model.")
    save_file(tensors, tmp_path / "base.safetensors")
    up, down = pair(16, 16, 2, 11)
    save_file(
        {f"diffusion_model.{Q}.lora_up.weight": up, f"diffusion_model.{Q}.lora_down.weight": down},
        tmp_path / "lora.safetensors",
    )
    lorafuse.merge(tmp_path / "base.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")
    name = f"model.diffusion_model.{Q}.weight"
    torch.testing.assert_close(merged[name], tensors[name] + up @ down, rtol=1e-6, atol=1e-6)
    assert sum(not torch.equal(merged[k], tensors[k]) for k in tensors) == 1


def test_plain_lora_a_b_with_alpha_and_nested_pt_file(tmp_path):
    tensors = unet_like()
    base = save_base(tmp_path / "base", tensors)
    up, down = pair(16, 16, 4, 12)
    state = {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up, f"unet.{Q}.alpha": torch.tensor(8.0)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "plain.pt")
    assert detect_format(tmp_path / "plain.pt") == "plain"
    merged = merged_tensors(tmp_path, base, tmp_path / "plain.pt")
    torch.testing.assert_close(merged[f"{Q}.weight"], tensors[f"{Q}.weight"] + 2 * up @ down, rtol=1e-6, atol=1e-6)


def test_forced_format_and_unknown_tensor_errors(tmp_path, capsys):
    base = save_base(tmp_path / "base", unet_like())
    up, down = pair(16, 16, 2, 13)
    save_file(
        {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down, f"{Q}.hada_w1_a": down.clone()},
        tmp_path / "bad.safetensors",
    )
    code = main(["merge", str(base), str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o")])
    assert code == 1
    assert "hada_w1_a" in capsys.readouterr().err
    # A plain file forced to be read as kohya is rejected by suffix (the diffusion layout reads lora_A/lora_B too).
    save_file({f"{Q}.lora_A.weight": down, f"{Q}.lora_B.weight": up}, tmp_path / "plain.safetensors")
    code = main(
        [
            "merge",
            str(base),
            str(tmp_path / "plain.safetensors"),
            "-o",
            str(tmp_path / "o"),
            "--adapter-format",
            "kohya",
        ]
    )
    assert code == 1
    assert "lora_A.weight" in capsys.readouterr().err
    code = main(
        [
            "merge",
            str(base),
            str(tmp_path / "plain.safetensors"),
            "-o",
            str(tmp_path / "o"),
            "--adapter-format",
            "plain",
        ]
    )
    assert code == 0


def test_peft_weights_without_config_are_refused(tmp_path):
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "adapter.safetensors")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        detect_format(tmp_path / "adapter.safetensors")


def test_allow_unmatched_skips_text_encoder_loras_of_a_kohya_file(tmp_path, capsys):
    """An SD LoRA file holds UNet and text-encoder LoRAs; merged into the UNet alone, the latter have no target."""
    base = save_base(tmp_path / "base", unet_like())
    up, down = pair(16, 16, 2, 3)
    t_up, t_down = pair(8, 8, 2, 4)
    flat = Q.replace(".", "_")
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file(
        {
            f"lora_unet_{flat}.lora_up.weight": up,
            f"lora_unet_{flat}.lora_down.weight": down,
            f"{te}.lora_up.weight": t_up,
            f"{te}.lora_down.weight": t_down,
        },
        tmp_path / "sd.safetensors",
    )
    with pytest.raises(LorafuseError, match=f"{te}.*--allow-unmatched"):
        lorafuse.merge(base, [tmp_path / "sd.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()

    report = lorafuse.merge(base, [tmp_path / "sd.safetensors"], tmp_path / "out", allow_unmatched=True)
    assert any("1 updates" in w and te in w for w in report.warnings)
    merged = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    want = unet_like()
    want[f"{Q}.weight"] = want[f"{Q}.weight"] + lora_product(up, down, (16, 16))
    for name in want:
        torch.testing.assert_close(merged[name], want[name], rtol=1e-6, atol=1e-6, msg=name)
    cli = ["merge", str(base), str(tmp_path / "sd.safetensors"), "-o", str(tmp_path / "cli"), "--allow-unmatched"]
    assert main(cli) == 0
