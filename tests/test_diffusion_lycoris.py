"""LyCORIS files (LoCon with lora_mid, LoHa, LoKr, DoRA, full, norms) trained with the lycoris-lora package on a tiny
UNet, merged by lorafuse, against what the package's trained modules compute: the UNet's output with the LyCORIS
network applied, and each module's merged weight.

The package's own ``merge_to`` multiplies LoHa and LoKr updates by alpha/r twice (its ``get_weight`` holds the
scale already): its forward, the function that was trained, is the oracle there (tested below, so a fixed package
shows here).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusion_oracle import tiny_unet
from lycoris import LycorisNetwork, create_lycoris
from lycoris.modules import FullModule, LohaModule, LokrModule
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.arrays import decode_f32
from lorafuse.edits import BlockOps
from lorafuse.engine.cuda import TorchOps
from lorafuse.engine.kernel import apply_edits
from lorafuse.errors import AdapterError
from lorafuse.formats import read_adapter
from lorafuse.io.checkpoint import open_model
from lorafuse.plan import build_plan

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# (algorithm, create_lycoris options): rank 4 with alpha 2 (scale 1/2) unless said otherwise
CASES = {
    "locon": ("locon", {}),
    "locon_tucker": ("locon", {"use_tucker": True}),
    "loha": ("loha", {}),
    "loha_tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {"factor": 2, "linear_dim": 2, "conv_dim": 2}),
    "lokr_tucker": ("lokr", {"factor": 2, "linear_dim": 2, "conv_dim": 2, "use_tucker": True}),
    "lokr_both": ("lokr", {"factor": 8, "linear_dim": 2, "conv_dim": 2, "decompose_both": True}),
    "lokr_whole": ("lokr", {"factor": 4}),  # both Kronecker factors stored whole: scale 1
    "full": ("full", {}),
    "glora": ("glora", {}),
    "dora": ("locon", {"dora_wd": True}),
    "dora_on_input": ("locon", {"dora_wd": True, "wd_on_output": False}),
    "doha": ("loha", {"dora_wd": True}),
    "norms": ("locon", {"train_norm": True}),
}


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lycoris") / "unet"
    torch.manual_seed(0)
    tiny_unet().save_pretrained(folder)
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"]})
    return folder


def trained(folder: Path, algo: str, options: dict, seed: int):
    """The base UNet with a LyCORIS network of ``algo`` applied, its weights random (as if trained)."""
    unet = UNet2DConditionModel.from_pretrained(folder)
    options = {"linear_dim": 4, "linear_alpha": 2, "conv_dim": 4, "conv_alpha": 2} | options
    network = create_lycoris(unet, 1.0, algo=algo, **options)
    network.apply_to()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            param.add_(torch.randn_like(param) * (0.02 if "dora_scale" in name else 0.2))
    return unet, network


def save_network(network, path: Path, prefix: str = "lycoris_") -> Path:
    tensors = {
        k.replace("lycoris_", prefix, 1): v.detach().contiguous().clone() for k, v in network.state_dict().items()
    }
    save_file(tensors, path)
    return path


def unet_output(unet) -> torch.Tensor:
    torch.manual_seed(7)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def forward_weights(network) -> dict[str, torch.Tensor]:
    """Each wrapped module's weight as the trained forward computes it (lycoris-lora's ``forward`` of each module)."""
    weights = {}
    for module in network.loras:
        with torch.no_grad():
            if isinstance(module, FullModule):  # apply_to() made module.weight the layer's whole weight
                weights[module.lora_name] = module.weight.detach().clone()
                continue
            org = module.org_module[0].weight
            if isinstance(module, (LohaModule, LokrModule)):  # forward adds get_weight, which holds the scale, once
                diff = module.get_weight(org.shape) * module.scalar
                if module.wd:
                    weight = module.apply_weight_decompose(org + diff, module.multiplier)
                else:
                    weight = org + diff * module.multiplier
            else:
                weight = module.get_merged_weight(module.multiplier, org.shape, org.device)[0]
        weights[module.lora_name] = weight
    return weights


@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_file_merges_as_the_trained_network_computes(unet_folder, tmp_path, case):
    algo, options = CASES[case]
    unet, network = trained(unet_folder, algo, options, seed=len(case))
    lora = save_network(network, tmp_path / f"{case}.safetensors")
    want_out, want_weights = unet_output(unet), forward_weights(network)

    report = lorafuse.merge(unet_folder, [lora], tmp_path / "out")
    merged = load_file(tmp_path / "out" / UNET_WEIGHTS)
    base = load_file(unet_folder / UNET_WEIGHTS)
    assert report.adapters[0]["parts"]["UNet/transformer"]["merged"] > 0
    for module in network.loras:
        key = next(k for k in merged if k.replace(".", "_") == module.lora_name.removeprefix("lycoris_") + "_weight")
        want = want_weights[module.lora_name].reshape(base[key].shape)
        assert not torch.equal(want, base[key]), f"{key}: the network changes nothing there"
        torch.testing.assert_close(merged[key], want, rtol=1e-5, atol=2e-6, msg=key)
        if isinstance(module, FullModule) and module.bias is not None:
            bias = key.removesuffix("weight") + "bias"
            torch.testing.assert_close(merged[bias], module.bias.detach(), rtol=1e-5, atol=2e-6, msg=bias)

    plain = UNet2DConditionModel.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(unet_output(plain), want_out, rtol=1e-4, atol=1e-5)


def edited_both_ways(folder: Path, lora: Path) -> list[tuple[str, np.ndarray, np.ndarray, torch.Tensor]]:
    """Each tensor of ``folder`` the merge of ``lora`` touches: (name, its stored rows, those rows edited by the
    numpy kernel's ops, and by the torch ops the --device cuda kernel uses, here on the CPU)."""
    base, _prefix, _index = open_model(folder)
    shapes = {name: info.shape for name, info in base.infos.items()}
    plan = build_plan(base, [read_adapter(lora, base_shapes=shapes)])
    edited = []
    for out in plan.touched:
        rows = base.infos[out.source].shape[0]
        stored = decode_f32(base.array(out.source), base.infos[out.source].dtype).reshape(rows, -1)
        on_numpy = stored.copy()
        apply_edits(out, on_numpy, 0, BlockOps(), lambda block: block.copy())
        on_torch = torch.from_numpy(stored.copy())
        apply_edits(out, on_torch, 0, TorchOps("cpu"), lambda block: block.clone())
        edited.append((out.name, stored, on_numpy, on_torch))
    return edited


@pytest.mark.parametrize("case", ["locon_tucker", "loha_tucker", "lokr_tucker", "dora", "dora_on_input", "glora"])
def test_the_cuda_kernels_torch_ops_compute_the_same(unet_folder, tmp_path, case):
    """The edits run on torch tensors (the --device cuda kernel's ops, here on the CPU) as on numpy."""
    algo, options = CASES[case]
    _unet, network = trained(unet_folder, algo, options, seed=9)
    lora = save_network(network, tmp_path / "l.safetensors")
    for name, _stored, on_numpy, on_torch in edited_both_ways(unet_folder, lora):
        torch.testing.assert_close(on_torch, torch.from_numpy(on_numpy), rtol=1e-5, atol=1e-6, msg=name)


def test_kohya_named_lycoris_file_merges_the_same(unet_folder, tmp_path):
    _unet, network = trained(unet_folder, "loha", {}, seed=3)
    lycoris = save_network(network, tmp_path / "lycoris.safetensors")
    kohya = save_network(network, tmp_path / "kohya.safetensors", prefix="lora_unet_")
    lorafuse.merge(unet_folder, [lycoris], tmp_path / "a")
    lorafuse.merge(unet_folder, [kohya], tmp_path / "b")
    a, b = load_file(tmp_path / "a" / UNET_WEIGHTS), load_file(tmp_path / "b" / UNET_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["loha", "dora"])
def test_strength_scales_as_the_networks_multiplier(unet_folder, tmp_path, case):
    assert_half_strength_is_half_multiplier(unet_folder, tmp_path, *CASES[case])


def assert_half_strength_is_half_multiplier(folder: Path, tmp_path: Path, algo: str, options: dict) -> None:
    """A merge at strength 0.5 gives the UNet output of the trained network with every module's multiplier 0.5."""
    unet, network = trained(folder, algo, options, seed=11)
    lora = save_network(network, tmp_path / "l.safetensors")
    for module in network.loras:  # what the forward reads (the network's own multiplier only seeds them)
        module.multiplier = 0.5
    want = unet_output(unet)
    lorafuse.merge(folder, [lora], tmp_path / "out", weights=[0.5])
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(unet_output(plain), want, rtol=1e-4, atol=1e-5)


def test_the_packages_own_merge_scales_loha_twice(unet_folder):
    """Why the oracle above is the forward: lycoris-lora's merge_to gives alpha/r * alpha/r * (M1 * M2)."""
    _unet, network = trained(unet_folder, "loha", {}, seed=5)
    module = network.loras[0]
    org = module.org_module[0]
    forward = forward_weights(network)[module.lora_name]
    merged = copy.deepcopy(org.weight)
    with torch.no_grad():
        module.merge_to(1.0)
    package = org.weight.detach().clone()
    org.weight.data.copy_(merged)
    assert module.scale == 0.5
    torch.testing.assert_close(package - merged, (forward - merged) * module.scale)


@pytest.mark.parametrize(("algo", "name"), [("ia3", "IA3")])  # OFT/BOFT: test_diffusion_lycoris_oft.py
def test_algorithms_lorafuse_does_not_merge_are_refused_naming_them(unet_folder, tmp_path, algo, name):
    _unet, network = trained(unet_folder, algo, {}, seed=4)
    lora = save_network(network, tmp_path / "x.safetensors")
    with pytest.raises(AdapterError, match=f"LyCORIS {name} tensor, which lorafuse does not merge"):
        lorafuse.merge(unet_folder, [lora], tmp_path / "out")


def test_alpha_zero_is_refused(unet_folder, tmp_path):
    _unet, network = trained(unet_folder, "locon", {}, seed=2)
    tensors = {k: v.detach().contiguous().clone() for k, v in network.state_dict().items()}
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key] = torch.tensor(0.0)
    save_file(tensors, tmp_path / "zero.safetensors")
    with pytest.raises(AdapterError, match="is 0, which trainers read as alpha = rank"):
        lorafuse.merge(unet_folder, [tmp_path / "zero.safetensors"], tmp_path / "out")
