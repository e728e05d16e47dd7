"""Every 2-D LoRA update is oriented as PEFT orients it, per layer (Linear (out, in) or GPT-2 Conv1D (in, out)),
from what the base says of its layers, or refused where nothing says it: never from the adapter's one
``fan_in_fan_out`` flag, which is only the value PEFT set for the last layer it wrapped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import make_peft_adapter, peft_merged, read_tensors
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorafuse
from lorafuse.cli import main
from lorafuse.conv1d import conv1d_modules, is_conv1d_weight
from lorafuse.errors import AdapterError, InputError, ShapeMismatchError

pytestmark = pytest.mark.filterwarnings("ignore:.*fan_in_fan_out.*:UserWarning")


class MixedNet(nn.Module):
    """A custom model (no config.json) with square and non-square Linear and transformers Conv1D layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_sq = Conv1D(16, 16)  # weight (in 16, out 16)
        self.lin_sq = nn.Linear(16, 16)
        self.conv_wide = Conv1D(24, 16)  # weight (16, 24)
        self.lin_wide = nn.Linear(24, 16)  # weight (16, 24) too: only the layer class tells them apart
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.lin_sq(torch.tanh(self.conv_sq(x))))
        return self.head(self.lin_wide(torch.tanh(self.conv_wide(x))))


def mixed_net(folder=None) -> MixedNet:
    torch.manual_seed(0)
    net = MixedNet()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.2)
    if folder is not None:
        net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval()


@pytest.fixture
def mixed_base(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in mixed_net().state_dict().items()}, folder / "model.safetensors")
    return folder


def mixed_adapter(base, out, targets):
    return make_peft_adapter(base, out, module=mixed_net(base), target_modules=targets)


def assert_like_peft(merged_dir, expected: dict[str, torch.Tensor], names):
    merged = read_tensors(merged_dir)
    for name in names:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mixed_square_layers_on_a_custom_model_are_refused_with_the_fix(mixed_base, tmp_path, capsys):
    adapter = mixed_adapter(mixed_base, tmp_path / "adapter", ["conv_sq", "lin_sq"])
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False  # lin_sq was last
    code = main(["merge", str(mixed_base), str(adapter), "-o", str(tmp_path / "out"), "--dtype", "fp32"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "conv_sq" in err and "square 16x16" in err and "--conv1d-modules" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_mixed_layers_named_by_the_flag_merge_like_peft(mixed_base, tmp_path, capsys):
    targets = ["conv_sq", "lin_sq", "conv_wide", "lin_wide"]
    adapter = mixed_adapter(mixed_base, tmp_path / "adapter", targets)
    out = tmp_path / "out"
    args = ["merge", str(mixed_base), str(adapter), "-o", str(out), "--dtype", "fp32"]
    assert main([*args, "--conv1d-modules", "conv_sq,conv_wide"]) == 0, capsys.readouterr().err
    expected = peft_merged(mixed_base, [adapter], module=mixed_net(mixed_base)).state_dict()
    assert_like_peft(out, expected, [f"{t}.weight" for t in targets])
    assert not torch.equal(read_tensors(out)["conv_sq.weight"], read_tensors(mixed_base)["conv_sq.weight"])
    verify = ["verify", str(out), "--base", str(mixed_base), "--adapter", str(adapter), "--no-output-check"]
    assert main([*verify, "--conv1d-modules", "conv_sq,conv_wide"]) == 0
    capsys.readouterr()
    assert main(verify) == 1  # verify cannot orient them either without the names
    assert "--conv1d-modules" in capsys.readouterr().err


def test_non_square_layers_are_oriented_by_their_shape_like_peft(mixed_base, tmp_path):
    """(16, 24) weights: conv_wide is Conv1D (in 16, out 24), lin_wide Linear (out 16, in 24); each fits one way."""
    adapter = mixed_adapter(mixed_base, tmp_path / "adapter", ["conv_wide", "lin_wide"])
    lorafuse.merge(mixed_base, [adapter], tmp_path / "out", dtype="fp32")
    expected = peft_merged(mixed_base, [adapter], module=mixed_net(mixed_base)).state_dict()
    assert_like_peft(tmp_path / "out", expected, ["conv_wide.weight", "lin_wide.weight"])


@pytest.fixture
def gpt2_single_file(gpt2, tmp_path):
    """The GPT-2 fixture's weights as one .safetensors file: no config.json says its layers are Conv1D."""
    path = tmp_path / "gpt2.safetensors"
    shutil.copy(gpt2 / "model.safetensors", path)
    return path


def flag_saved_off(adapter):
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["fan_in_fan_out"] = False  # as other tools save it, or PEFT after a Linear layer came last
    config_path.write_text(json.dumps(config))
    return adapter


@pytest.mark.parametrize("saved_flag", [True, False])
def test_gpt2_single_file_with_a_square_conv1d_is_refused(gpt2, gpt2_single_file, saved_flag, tmp_path):
    adapter = make_peft_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn", "c_proj"])
    if not saved_flag:
        flag_saved_off(adapter)
    with pytest.raises(AdapterError, match=r"attn\.c_proj.*square 32x32.*--conv1d-modules"):
        lorafuse.merge(gpt2_single_file, [adapter], tmp_path / "merged.safetensors", dtype="fp32")


def test_gpt2_single_file_with_named_conv1d_modules_merges_like_peft(gpt2, gpt2_single_file, tmp_path):
    adapter = flag_saved_off(make_peft_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn", "c_proj"]))
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(gpt2_single_file, [adapter], out, dtype="fp32", conv1d_modules="c_attn,c_proj,c_fc")
    expected = peft_merged(gpt2, [adapter]).state_dict()
    merged = load_file(out)
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.attn.c_attn.weight"):
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    folder = tmp_path / "folder"
    lorafuse.merge(gpt2, [adapter], folder, dtype="fp32")  # its config.json tells the same without the flag
    assert read_tensors(folder).keys() == merged.keys()
    assert all(torch.equal(read_tensors(folder)[k], merged[k]) for k in merged)


def test_a_single_file_in_its_model_folder_is_oriented_by_the_config_beside_it(gpt2, tmp_path):
    adapter = flag_saved_off(make_peft_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn", "c_proj"]))
    out = tmp_path / "merged.safetensors"
    lorafuse.merge(gpt2 / "model.safetensors", [adapter], out, dtype="fp32")
    expected = peft_merged(gpt2, [adapter]).state_dict()
    name = "transformer.h.0.attn.c_proj.weight"
    torch.testing.assert_close(load_file(out)[name], expected[name], rtol=1e-5, atol=1e-6)


def test_the_config_decides_and_a_misfit_is_not_flipped_to_fit(gpt2, tmp_path):
    """``--conv1d-modules none`` says c_attn is a Linear layer: its (32, 96) update then fits no way it is read."""
    adapter = make_peft_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn"])
    with pytest.raises(ShapeMismatchError, match="c_attn"):
        lorafuse.merge(gpt2, [adapter], tmp_path / "out", dtype="fp32", conv1d_modules="none")


def test_custom_code_leaves_square_layers_unknown(llama_untied, tmp_path):
    base = tmp_path / "custom"
    shutil.copytree(llama_untied, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="q_proj.*--conv1d-modules"):
        lorafuse.merge(base, [adapter], tmp_path / "out", dtype="fp32")
    lorafuse.merge(base, [adapter], tmp_path / "out", dtype="fp32", conv1d_modules="none")
    expected = peft_merged(llama_untied, [adapter]).state_dict()
    names = [k for k in expected if "q_proj" in k]
    assert len(names) == 2
    assert_like_peft(tmp_path / "out", expected, names)


def test_layer_classes_from_configs_and_names():
    weight = "transformer.h.0.attn.c_proj.weight"
    assert is_conv1d_weight({"model_type": "gpt2"}, weight) is True
    assert is_conv1d_weight({"model_type": "gpt_bigcode"}, weight) is False  # nn.Linear c_proj there
    assert is_conv1d_weight({"model_type": "gpt2", "auto_map": {"AutoModel": "x.Y"}}, weight) is None
    assert is_conv1d_weight(None, weight) is None
    assert is_conv1d_weight({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0"}, weight) is False
    assert is_conv1d_weight(None, weight, conv1d_modules("attn.c_proj")) is True
    assert is_conv1d_weight({"model_type": "gpt2"}, weight, conv1d_modules("none")) is False
    assert is_conv1d_weight(None, "h.0.attn.proj.weight", conv1d_modules("c_proj")) is False  # whole name parts
    experts = "model.layers.0.mlp.experts.down_proj"  # gpt-oss stores its experts (experts, in, out)
    assert is_conv1d_weight({"model_type": "gpt_oss"}, experts) is True
    assert is_conv1d_weight({"model_type": "gpt_oss"}, experts + "_bias") is False
    assert is_conv1d_weight({"model_type": "qwen3_moe"}, experts) is False


@pytest.mark.parametrize("value", ["", " ", "c_attn,,c_proj", "none,c_attn", ["c_attn", 3]])
def test_bad_conv1d_module_lists_are_one_line_errors(value):
    with pytest.raises(InputError, match="--conv1d-modules"):
        conv1d_modules(value)
