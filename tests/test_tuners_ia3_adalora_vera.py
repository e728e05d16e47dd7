"""PEFT IA3, AdaLoRA, VeRA and PVeRA adapters merge as PEFT's ``merge_and_unload()`` merges them: every layer type
PEFT wraps with each (Linear, GPT-2 Conv1D, Conv2d/3d, grouped convs for IA3), feed-forward and other IA3 layers
with and without biases, AdaLoRA's pruned ranks (rank_pattern), VeRA's projections saved or regenerated from
``projection_prng_key``, ``--weight``, IA3 before and after LoRA, a tiny Qwen3 and a GPT-2 from transformers
configs. PEFT initialises the trained vectors to ones or zeros: every adapter parameter is randomised before saving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, PveraConfig, VeraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D
from tuner_helpers import load_module, peft_merged_in_turn, save_module, tiny_qwen3

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import AdapterError
from lorafuse.torch_bridge import MissingExtraError

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's fan_in_fan_out / PRNG notes


class Zoo(nn.Module):
    """Every layer type these tuners wrap: Linear (one square, one without bias), GPT-2 Conv1D (square and not),
    Conv2d (plain and grouped), Conv3d. Saved as a bare safetensors file (no config.json)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 20)
        self.ff = nn.Linear(20, 12)
        self.nobias = nn.Linear(12, 8, bias=False)
        self.square = nn.Linear(16, 16)
        self.c1d = Conv1D(20, 12)  # weight (12, 20): (in, out)
        self.c1d_square = Conv1D(16, 16)
        self.conv = nn.Conv2d(4, 6, 3)
        self.gconv = nn.Conv2d(4, 6, 3, groups=2)
        self.conv3 = nn.Conv3d(4, 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


CONV1D = "c1d,c1d_square"  # --conv1d-modules for the zoo: it has no config.json to tell
LINEAR_LIKE = ["lin", "ff", "nobias", "square", "c1d", "c1d_square"]


def _save_zoo(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    zoo = Zoo()
    with torch.no_grad():
        for param in zoo.parameters():
            param.add_(0.1 * torch.randn(param.shape))  # Conv1D starts with zero biases
    return save_module(zoo, folder)


def _randomize(model: nn.Module, seed: int) -> None:
    """Every trained adapter parameter off PEFT's initial ones/zeros (IA3 vectors around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.5 * noise if "ia3_l" in name else 0.5 * noise)


def _make_adapter(base: nn.Module, config, out: Path, seed: int = 1, rank_pattern: dict | None = None) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    _randomize(model, seed)
    if rank_pattern is not None:  # what AdaLoRA's rank allocator leaves after pruning; applied by save_pretrained
        model.peft_config["default"].rank_pattern = rank_pattern
    model.save_pretrained(out)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        got.update(load_file(path))
    return got


def _assert_same(merged_dir: Path, expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> list[str]:
    """The merged model is PEFT's, tensor by tensor; returns what moved (each case checks it moved what it must)."""
    got = _tensors(merged_dir)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=ATOL, atol=ATOL, msg=name)
    return sorted(k for k in base if not torch.equal(base[k], expected[k]))


def _merge_zoo(tmp_path: Path, configs: list, **merge_kwargs) -> tuple[list[str], Any]:
    base_dir = _save_zoo(tmp_path / "base")
    adapters = [
        _make_adapter(load_module(Zoo(), base_dir), c, tmp_path / f"a{i}", seed=i + 1) for i, c in enumerate(configs)
    ]
    out = tmp_path / "merged"
    report = lorafuse.merge(base_dir, adapters, out, dtype="fp32", conv1d_modules=CONV1D, **merge_kwargs)
    expected = peft_merged_in_turn(load_module(Zoo(), base_dir), adapters)
    return _assert_same(out, expected, load_file(base_dir / "model.safetensors")), report


# --- IA3 -----------------------------------------------------------------------------------------------------------

IA3_ALL = ["lin", "ff", "nobias", "square", "c1d", "c1d_square", "conv", "gconv", "conv3"]


@pytest.mark.parametrize(
    "feedforward",
    [
        pytest.param(["ff", "square", "c1d", "gconv", "conv3"], id="mixed"),
        pytest.param([], id="none-feedforward"),
        pytest.param(IA3_ALL, id="all-feedforward"),
        pytest.param(r"(ff|c1d_square|conv)", id="regex"),
    ],
)
def test_ia3_zoo_matches_peft(feedforward, tmp_path):
    moved, report = _merge_zoo(tmp_path, [IA3Config(target_modules=IA3_ALL, feedforward_modules=feedforward)])
    if isinstance(feedforward, list):  # PEFT: a plain string end, so "square" makes c1d_square feed-forward too
        ff = {m for m in IA3_ALL if any(m.endswith(f) for f in feedforward)}
    else:
        ff = {"ff", "c1d_square", "conv"}
    weights = {f"{m}.weight" for m in IA3_ALL}
    biases = {f"{m}.bias" for m in IA3_ALL if m not in ff and m != "nobias"}  # PEFT scales other layers' biases
    assert set(moved) == weights | biases
    assert report.warnings == []


def test_ia3_weight_moves_the_vector_toward_one(tmp_path):
    """PEFT has no strength for IA3; lorafuse's --weight s merges the vector 1 + s * (l - 1)."""
    base_dir = _save_zoo(tmp_path / "base")
    config = IA3Config(target_modules=IA3_ALL, feedforward_modules=["ff", "c1d", "gconv"])
    adapter = _make_adapter(load_module(Zoo(), base_dir), config, tmp_path / "adapter")
    out = tmp_path / "merged"
    argv = ["merge", str(base_dir), str(adapter), "-o", str(out), "--dtype", "fp32", "--weight", "0.5"]
    assert main([*argv, "--conv1d-modules", CONV1D]) == 0
    model = PeftModel.from_pretrained(load_module(Zoo(), base_dir), adapter)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.5 * (param - 1))
    expected = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    assert _assert_same(out, expected, load_file(base_dir / "model.safetensors"))


@pytest.mark.parametrize("order", ["lora-then-ia3", "ia3-then-lora"])
def test_ia3_and_lora_in_sequence(order, tmp_path):
    """A multiplicative edit scales the weight as the adapters before it left it, in the order given."""
    lora = LoraConfig(target_modules=["lin", "ff", "c1d", "conv"], r=3, lora_alpha=6, init_lora_weights=False)
    ia3 = IA3Config(target_modules=["lin", "ff", "c1d", "conv", "gconv"], feedforward_modules=["ff", "conv"])
    configs = [lora, ia3] if order == "lora-then-ia3" else [ia3, lora]
    moved, _ = _merge_zoo(tmp_path, configs)
    assert {"lin.weight", "ff.weight", "c1d.weight", "conv.weight", "gconv.weight", "lin.bias"} <= set(moved)


def test_ia3_gpt2_through_cli(gpt2, tmp_path):
    """GPT-2's Conv1D layers from its config.json (no --conv1d-modules): c_attn, c_proj and mlp.c_fc are square or
    not; mlp.c_proj is feed-forward."""
    from transformers import AutoModelForCausalLM

    targets = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    config = IA3Config(target_modules=targets, feedforward_modules=["mlp.c_proj"])
    adapter = _make_adapter(AutoModelForCausalLM.from_pretrained(gpt2), config, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", str(gpt2), str(adapter), "-o", str(out), "--dtype", "fp32"]) == 0
    expected = peft_merged_in_turn(AutoModelForCausalLM.from_pretrained(gpt2), [adapter])
    got = _tensors(out)
    for name, value in expected.items():
        if name in got:
            torch.testing.assert_close(got[name], value, rtol=ATOL, atol=ATOL, msg=name)
    assert not torch.equal(got["transformer.h.0.attn.c_attn.bias"], _tensors(gpt2)["transformer.h.0.attn.c_attn.bias"])


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(IA3Config(target_modules=["square", "lin"], feedforward_modules=[]), id="ia3"),
        pytest.param(AdaLoraConfig(target_modules=["square", "lin"], init_r=2, total_step=5), id="adalora"),
        pytest.param(VeraConfig(target_modules=["square", "lin"], r=2), id="vera"),
    ],
)
def test_square_layer_without_evidence_is_refused(config, tmp_path):
    """No config.json and no --conv1d-modules: a square weight may be Linear or Conv1D, so it is refused (the
    non-square one beside it is oriented by its shape)."""
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(load_module(Zoo(), base_dir), config, tmp_path / "a")
    with pytest.raises(AdapterError, match=r"'base_model\.model\.square\..*square 16x16 weight .* --conv1d-modules"):
        lorafuse.merge(base_dir, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ia3_config_that_contradicts_the_vectors_is_refused(tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(
        load_module(Zoo(), base_dir), IA3Config(target_modules=["lin"], feedforward_modules=[]), tmp_path / "a"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["feedforward_modules"] = ["lin"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["merge", str(base_dir), str(adapter), "-o", str(tmp_path / "out")]) != 0


def test_ia3_untrained_adapter_changes_nothing(tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    model = get_peft_model(
        load_module(Zoo(), base_dir), IA3Config(target_modules=["lin", "conv"], feedforward_modules=[])
    )
    model.save_pretrained(tmp_path / "a")  # PEFT's init: every vector is ones
    report = lorafuse.merge(base_dir, [tmp_path / "a"], tmp_path / "out", conv1d_modules="none")
    assert any("changes nothing" in w for w in report.warnings)
    assert _tensors(tmp_path / "out").keys() == load_file(base_dir / "model.safetensors").keys()


# --- AdaLoRA -------------------------------------------------------------------------------------------------------

ADA_MODULES = ["lin", "ff", "nobias", "square", "c1d", "c1d_square", "conv"]


def _adalora(**kwargs) -> AdaLoraConfig:
    return AdaLoraConfig(target_modules=ADA_MODULES, total_step=10, **{"init_r": 4, "lora_alpha": 6, **kwargs})


@pytest.mark.parametrize(
    ("config", "rank_pattern"),
    [
        pytest.param(_adalora(), None, id="unpruned"),
        pytest.param(_adalora(lora_alpha=0), None, id="alpha-0-scales-by-rank"),
        pytest.param(
            _adalora(),
            {
                "lin.lora_E": [True, False, True, False],
                "c1d.lora_E": [False, False, True, False],
                "conv.lora_E": [True, True, False, True],
                "square.lora_E": [False] * 4,
            },
            id="pruned",
        ),
        pytest.param(_adalora(lora_alpha=0), {"ff.lora_E": [True, False, False, True]}, id="pruned-alpha-0"),
    ],
)
def test_adalora_zoo_matches_peft(config, rank_pattern, tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(load_module(Zoo(), base_dir), config, tmp_path / "adapter", rank_pattern=rank_pattern)
    out = tmp_path / "merged"
    lorafuse.merge(base_dir, [adapter], out, dtype="fp32", conv1d_modules=CONV1D)
    expected = peft_merged_in_turn(load_module(Zoo(), base_dir), [adapter])  # PEFT's load resizes by rank_pattern
    moved = _assert_same(out, expected, load_file(base_dir / "model.safetensors"))
    pruned_away = {"square.weight"} if rank_pattern and "square.lora_E" in rank_pattern else set()
    assert set(moved) == {f"{m}.weight" for m in ADA_MODULES} - pruned_away
    if rank_pattern:
        saved = load_file(adapter / "adapter_model.safetensors")
        for key, mask in rank_pattern.items():  # the pruned ranks are really gone from the file
            assert saved[f"base_model.model.{key.rpartition('.')[0]}.lora_A"].shape[0] == sum(mask)


def test_adalora_weight_through_cli(tmp_path):
    """--weight scales AdaLoRA's update as it scales PEFT's ``scaling`` of each layer."""
    base_dir = _save_zoo(tmp_path / "base")
    pattern = {"lin.lora_E": [True, False, True, True]}
    adapter = _make_adapter(load_module(Zoo(), base_dir), _adalora(), tmp_path / "adapter", rank_pattern=pattern)
    out = tmp_path / "merged"
    argv = ["merge", str(base_dir), str(adapter), "-o", str(out), "--dtype", "fp32", "--weight", "0.5"]
    assert main([*argv, "--conv1d-modules", CONV1D]) == 0
    model = PeftModel.from_pretrained(load_module(Zoo(), base_dir), adapter)
    for layer in model.modules():
        if isinstance(getattr(layer, "scaling", None), dict) and "default" in layer.scaling:
            layer.scaling["default"] *= 0.5
    expected = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    assert _assert_same(out, expected, load_file(base_dir / "model.safetensors"))


def test_adalora_rank_pattern_that_does_not_fit_the_weights_is_refused(tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(load_module(Zoo(), base_dir), _adalora(), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"lin.lora_E": [True, False, False, False]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"'lin' saves rank 4 .* rank_pattern keeps 1"):
        lorafuse.merge(base_dir, [adapter], tmp_path / "out", conv1d_modules=CONV1D)


# --- VeRA / PVeRA --------------------------------------------------------------------------------------------------

VERA_MODULES = ["lin", "ff", "nobias", "square", "c1d", "c1d_square"]


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(VeraConfig(target_modules=VERA_MODULES, r=4), id="vera-saved"),
        pytest.param(VeraConfig(target_modules=VERA_MODULES, r=3, save_projection=False), id="vera-regenerated"),
        pytest.param(
            VeraConfig(target_modules=VERA_MODULES, r=5, save_projection=False, projection_prng_key=1234),
            id="vera-regenerated-key",
        ),
        pytest.param(PveraConfig(target_modules=VERA_MODULES, r=4), id="pvera-saved"),
        pytest.param(PveraConfig(target_modules=VERA_MODULES, r=2, save_projection=False), id="pvera-regenerated"),
    ],
)
def test_vera_zoo_matches_peft(config, tmp_path):
    moved, report = _merge_zoo(tmp_path, [config])
    assert set(moved) == {f"{m}.weight" for m in VERA_MODULES}
    assert report.warnings == []


def test_vera_regenerated_projections_are_peft_s(tmp_path):
    """The rebuilt A and B are bit for bit the ones PEFT builds from the key (sized by the largest layer)."""
    from lorafuse.tuners.vera import Regenerated

    base_dir = _save_zoo(tmp_path / "base")
    config = VeraConfig(target_modules=VERA_MODULES, r=3, save_projection=False, projection_prng_key=77)
    model = get_peft_model(load_module(Zoo(), base_dir), config)
    regenerated = Regenerated(77, 3, 3, 20, frozenset(["a", "b"]), "test")
    regenerated.note("a", 12)
    regenerated.note("b", 20)
    a, b = regenerated.matrices()
    assert torch.equal(torch.from_numpy(a), model.base_model.vera_A["default"])
    assert torch.equal(torch.from_numpy(b), model.base_model.vera_B["default"])


def test_vera_regenerated_without_torch_is_one_line(tmp_path, monkeypatch):
    base_dir = _save_zoo(tmp_path / "base")
    config = VeraConfig(target_modules=["lin"], r=2, save_projection=False)
    adapter = _make_adapter(load_module(Zoo(), base_dir), config, tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails, as where it is not installed
    with pytest.raises(MissingExtraError, match=r"save_projection=false\) needs PyTorch.*lorafuse\[torch\]"):
        lorafuse.merge(base_dir, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vera_weight_and_lora_after_it(tmp_path):
    """--weight scales VeRA's update (PEFT: the scaled update); then a LoRA applies on the result."""
    base_dir = _save_zoo(tmp_path / "base")
    vera = _make_adapter(load_module(Zoo(), base_dir), VeraConfig(target_modules=["lin", "c1d"], r=4), tmp_path / "v")
    lora = _make_adapter(
        load_module(Zoo(), base_dir),
        LoraConfig(target_modules=["lin"], r=2, init_lora_weights=False),
        tmp_path / "l",
        seed=3,
    )
    out = tmp_path / "merged"
    lorafuse.merge(base_dir, [vera, lora], out, weights=[0.25, 1.0], dtype="fp32", conv1d_modules=CONV1D)
    model = PeftModel.from_pretrained(load_module(Zoo(), base_dir), vera)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda_b" in name:
                param.mul_(0.25)
    expected = peft_merged_in_turn(model.merge_and_unload(), [lora])
    assert _assert_same(out, expected, load_file(base_dir / "model.safetensors"))


# --- a tiny Qwen3 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "qwen3", attention_bias=True)


QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(IA3Config(target_modules=QWEN_TARGETS, feedforward_modules=["down_proj", "o_proj"]), id="ia3"),
        pytest.param(AdaLoraConfig(target_modules=QWEN_TARGETS, init_r=3, lora_alpha=5, total_step=5), id="adalora"),
        pytest.param(VeraConfig(target_modules=QWEN_TARGETS, r=4, save_projection=False), id="vera-regenerated"),
    ],
)
def test_qwen3_matches_peft(config, qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = _make_adapter(AutoModelForCausalLM.from_pretrained(qwen3), config, tmp_path / "adapter")
    out = tmp_path / "merged"
    lorafuse.merge(qwen3, [adapter], out, dtype="fp32")
    expected = peft_merged_in_turn(AutoModelForCausalLM.from_pretrained(qwen3), [adapter])
    got = _tensors(out)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=ATOL, atol=ATOL, msg=name)
    moved = [k for k, v in _tensors(qwen3).items() if not torch.equal(v, got[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.layers.0.mlp.down_proj.weight" in moved
    if isinstance(config, IA3Config):  # q/k/v have biases: PEFT scales them (not o_proj's or down_proj's inputs)
        assert "model.layers.0.self_attn.q_proj.bias" in moved


# --- inspect -------------------------------------------------------------------------------------------------------


def test_inspect_names_each_kind(tmp_path, capsys):
    base_dir = _save_zoo(tmp_path / "base")
    for name, config in {
        "ia3": IA3Config(target_modules=["lin"], feedforward_modules=[]),
        "adalora": AdaLoraConfig(target_modules=["lin"], init_r=2, total_step=5),
        "vera": VeraConfig(target_modules=["lin"], r=2),
    }.items():
        adapter = _make_adapter(load_module(Zoo(), base_dir), config, tmp_path / name)
        assert main(["inspect", str(adapter), "--json"]) == 0
        text = capsys.readouterr().out
        assert f'"kind": "{name}"' in text


# --- the torch kernel and the runtime ------------------------------------------------------------------------------

TORCH_CASES = {
    "ia3": IA3Config(target_modules=IA3_ALL, feedforward_modules=["ff", "c1d", "gconv", "conv3"]),
    "ia3-outputs": IA3Config(target_modules=IA3_ALL, feedforward_modules=[]),
    "adalora": _adalora(),
    "vera-regenerated": VeraConfig(target_modules=VERA_MODULES, r=3, save_projection=False),
    "pvera": PveraConfig(target_modules=VERA_MODULES, r=2),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_ops_match_numpy_block_by_block(case, tmp_path):
    """The CUDA kernel and the runtime apply the same edits through TorchOps (here on the CPU): row blocks of 2
    (across a grouped conv's groups of 3 output channels) and numpy blocks of 4 give the whole tensor's values."""
    from lorafuse.edits import BlockOps
    from lorafuse.engine.cuda import TorchOps
    from lorafuse.formats import read_adapter

    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(load_module(Zoo(), base_dir), TORCH_CASES[case], tmp_path / "adapter")
    base = load_file(base_dir / "model.safetensors")
    # every edit oriented first, as the plan does (VeRA's regenerated projections need every layer's size)
    present = [t for t in read_adapter(adapter).edits if t.target in base]  # not a bias a layer does not have
    oriented = [(t, t.edit.oriented(tuple(base[t.target].shape), t.target.startswith("c1d"))) for t in present]
    for targeted, edit in oriented:
        weight = base[targeted.target].reshape(base[targeted.target].shape[0], -1)
        expected = weight.numpy().copy()
        edit.apply(expected, slice(0, len(expected)), BlockOps())
        assert not np.allclose(expected, weight.numpy()), targeted.target
        for step, ops, values in ((2, TorchOps("cpu"), weight.clone()), (4, BlockOps(), weight.numpy().copy())):
            for start in range(0, len(values), step):
                rows = slice(start, min(start + step, len(values)))
                edit.apply(values[rows], rows, ops)
            got = values.numpy() if isinstance(values, torch.Tensor) else values
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=targeted.target)


def test_runtime_applies_ia3_as_peft_merges_it(tmp_path):
    """lorafuse.runtime on a live model: IA3's bias scaling lands where a layer has a bias and is skipped where
    it has none."""
    from lorafuse.runtime import apply_adapter

    base_dir = _save_zoo(tmp_path / "base")
    config = IA3Config(target_modules=IA3_ALL, feedforward_modules=["ff", "gconv"])
    adapter = _make_adapter(load_module(Zoo(), base_dir), config, tmp_path / "adapter")
    live = load_module(Zoo(), base_dir)
    apply_adapter(live, adapter)
    expected = peft_merged_in_turn(load_module(Zoo(), base_dir), [adapter])
    for name, value in live.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=ATOL, atol=ATOL, msg=name)
