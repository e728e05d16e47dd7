"""LyCORIS OFT ("diag-oft") and BOFT files, trained with the lycoris-lora package on a tiny UNet, merged by lorafuse,
against what the package's trained modules compute: each module's forward on random inputs, and the UNet's output
with the network applied (at strength 1 and at the network's multiplier 0.5). The package's ``merge_to`` computes
the same weights as its forward for these two (checked below, so a change in the package shows here). The runtime
(``lorafuse.runtime.apply_adapter``) and ``merge --verify`` take these files, and LyCORIS DoRA ones (an edit that
wraps another), too.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from test_diffusion_lycoris import (  # noqa: F401
    UNET_WEIGHTS,
    assert_half_strength_is_half_multiplier,
    edited_both_ways,
    save_network,
    trained,
    unet_folder,
    unet_output,
)

import lorafuse
from lorafuse.cli import main
from lorafuse.edits import Edit, TensorRef
from lorafuse.errors import AdapterError, ShapeMismatchError
from lorafuse.runtime import apply_adapter
from lorafuse.runtime.apply import runtime_state

# (algorithm, create_lycoris options): block size 4 (lora_dim) unless said otherwise
CASES = {
    "oft": ("diag-oft", {}),
    "oft_rescaled": ("diag-oft", {"rescaled": True}),
    "oft_constrained": ("diag-oft", {"constraint": 0.002, "rescaled": True}),  # the norm limit binds
    "oft_one_block": ("diag-oft", {"linear_dim": 64, "conv_dim": 64}),  # block size = the whole output dim
    "boft": ("boft", {}),
    "boft_rescaled": ("boft", {"rescaled": True}),
    "boft_constrained": ("boft", {"constraint": 0.002}),
    "boft_two_blocks": ("boft", {"linear_dim": 2, "conv_dim": 2}),
}


def module_inputs(module) -> torch.Tensor:
    org = module.org_module[0]
    torch.manual_seed(3)
    if isinstance(org, torch.nn.Linear):
        return torch.randn(5, org.in_features)
    return torch.randn(2, org.in_channels, 6, 6)


def key_of(merged: dict, module) -> str:
    flat = module.lora_name.removeprefix("lycoris_") + "_weight"
    return next(k for k in merged if k.replace(".", "_") == flat)


def layer_output(module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    org = module.org_module[0]
    if isinstance(org, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, org.bias)
    return torch.nn.functional.conv2d(x, weight, org.bias, org.stride, org.padding, org.dilation, org.groups)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_oft_file_merges_as_the_trained_network_computes(unet_folder, tmp_path, case):  # noqa: F811
    algo, options = CASES[case]
    unet, network = trained(unet_folder, algo, options, seed=len(case))
    lora = save_network(network, tmp_path / f"{case}.safetensors")
    want_out = unet_output(unet)

    report = lorafuse.merge(unet_folder, [lora], tmp_path / "out")
    merged = load_file(tmp_path / "out" / UNET_WEIGHTS)
    base = load_file(unet_folder / UNET_WEIGHTS)
    assert report.adapters[0]["parts"]["UNet/transformer"]["merged"] == len(network.loras)
    for module in network.loras:
        key = key_of(merged, module)
        x = module_inputs(module)
        with torch.no_grad():
            want = module(x)  # the trained module's forward
            got = layer_output(module, merged[key], x)
            unchanged = layer_output(module, base[key], x)
        assert not torch.allclose(want, unchanged, atol=1e-4), f"{key}: the network changes nothing there"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=key)

    plain = UNet2DConditionModel.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(unet_output(plain), want_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["oft_rescaled", "boft_rescaled"])
def test_strength_is_the_networks_multiplier(unet_folder, tmp_path, case):  # noqa: F811
    """LyCORIS scales each rotation (each BOFT stage) toward I and keeps the rescale whole: not a linear blend."""
    assert_half_strength_is_half_multiplier(unet_folder, tmp_path, *CASES[case])


@pytest.mark.parametrize("case", ["oft_constrained", "boft_rescaled"])
def test_the_cuda_kernels_torch_ops_compute_the_same(unet_folder, tmp_path, case):  # noqa: F811
    algo, options = CASES[case]
    _unet, network = trained(unet_folder, algo, options, seed=9)
    lora = save_network(network, tmp_path / "l.safetensors")
    edited = edited_both_ways(unet_folder, lora)
    assert edited
    for name, stored, on_numpy, on_torch in edited:
        assert not torch.equal(on_torch, torch.from_numpy(stored)), name
        torch.testing.assert_close(on_torch, torch.from_numpy(on_numpy), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["oft_constrained", "boft_rescaled"])
def test_the_packages_merge_to_agrees_with_its_forward(unet_folder, case):  # noqa: F811
    algo, options = CASES[case]
    _unet, network = trained(unet_folder, algo, options, seed=5)
    for module in network.loras[:3]:
        org = module.org_module[0]
        x = module_inputs(module)
        with torch.no_grad():
            forward = module(x)
            kept = copy.deepcopy(org.weight)
            module.merge_to(1.0)
            merged = layer_output(module, org.weight, x)
            org.weight.copy_(kept)
        torch.testing.assert_close(merged, forward, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix", ["lora_unet_", "diffusion_model."])
def test_kohya_and_diffusion_model_named_oft_files_merge_the_same(unet_folder, tmp_path, prefix):  # noqa: F811
    """sd-scripts and ComfyUI-style names of the same LyCORIS tensors."""
    _unet, network = trained(unet_folder, "boft", {"rescaled": True}, seed=3)
    lycoris = save_network(network, tmp_path / "lycoris.safetensors")
    tensors = load_file(lycoris)
    if prefix == "lora_unet_":
        renamed = {prefix + k.removeprefix("lycoris_"): v for k, v in tensors.items()}
    else:  # dotted module names: diffusion_model.down_blocks.0...., from the base's own names
        base = load_file(unet_folder / UNET_WEIGHTS)
        dotted = {k.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight") for k in base}
        renamed = {}
        for key, value in tensors.items():
            module, _, slot = key.removeprefix("lycoris_").partition(".")
            renamed[f"{prefix}{dotted[module]}.{slot}"] = value
    save_file(renamed, tmp_path / "renamed.safetensors")
    lorafuse.merge(unet_folder, [lycoris], tmp_path / "a")
    lorafuse.merge(unet_folder, [tmp_path / "renamed.safetensors"], tmp_path / "b")
    a, b = load_file(tmp_path / "a" / UNET_WEIGHTS), load_file(tmp_path / "b" / UNET_WEIGHTS)
    base = load_file(unet_folder / UNET_WEIGHTS)
    assert sum(not torch.equal(a[k], base[k]) for k in a) == len(network.loras)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_oft_blocks_that_do_not_cover_the_rows_are_refused(unet_folder, tmp_path):  # noqa: F811
    _unet, network = trained(unet_folder, "diag-oft", {}, seed=2)
    tensors = {k: v.detach().contiguous().clone() for k, v in network.state_dict().items()}
    key = next(k for k in tensors if k.endswith(".oft_blocks"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, tmp_path / "short.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"LyCORIS OFT blocks \(3 of 4 rows\) do not cover the 16 rows"):
        lorafuse.merge(unet_folder, [tmp_path / "short.safetensors"], tmp_path / "out")


def test_oft_without_its_alpha_is_refused(unet_folder, tmp_path):  # noqa: F811
    """alpha is OFT's norm constraint (0: none); without it the limit is unknown."""
    _unet, network = trained(unet_folder, "boft", {}, seed=2)
    tensors = {k: v.detach().contiguous().clone() for k, v in network.state_dict().items() if not k.endswith("alpha")}
    save_file(tensors, tmp_path / "noalpha.safetensors")
    with pytest.raises(AdapterError, match="has no alpha .the OFT norm constraint."):
        lorafuse.merge(unet_folder, [tmp_path / "noalpha.safetensors"], tmp_path / "out")


def file_refs(edit: Edit) -> list[str]:
    """The adapter-file tensors an edit (and any edit it wraps) still reads from disk."""
    found = []
    for f in dataclasses.fields(edit):
        value = getattr(edit, f.name)
        if isinstance(value, Edit):
            found += file_refs(value)
        elif isinstance(value, TensorRef):
            found.append(value.name)
    return found


@pytest.mark.parametrize(
    ("algo", "options"),
    [("diag-oft", {"rescaled": True, "constraint": 0.002}), ("boft", {"rescaled": True}), ("loha", {"dora_wd": True})],
)
def test_the_runtime_computes_what_the_trained_network_does(unet_folder, tmp_path, algo, options):  # noqa: F811
    unet, network = trained(unet_folder, algo, options, seed=6)
    lora = save_network(network, tmp_path / "l.safetensors")
    plain = UNet2DConditionModel.from_pretrained(unet_folder)
    apply_adapter(plain, lora)
    slots = runtime_state(plain).slots.values()
    assert len(slots) == len(network.loras)
    # every tensor is in memory (a DoRA edit's inner LoHa included): the file may change or go away
    assert [ref for slot in slots for _name, edits in slot.entries for e in edits for ref in file_refs(e)] == []
    torch.testing.assert_close(unet_output(plain), unet_output(unet), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", ["boft", "locon"])  # locon: LyCORIS DoRA
def test_merge_verify_passes_on_lycoris_oft_and_dora_files(unet_folder, tmp_path, algo):  # noqa: F811
    _unet, network = trained(unet_folder, algo, {"rescaled": True} if algo == "boft" else {"dora_wd": True}, seed=8)
    lora = save_network(network, tmp_path / "l.safetensors")
    assert main(["merge", str(unet_folder), str(lora), "-o", str(tmp_path / "out"), "--verify", "--quiet"]) == 0
