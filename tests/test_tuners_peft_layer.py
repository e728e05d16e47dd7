"""Tuners merged through PEFT's own layer merge (tuners/peft_layer.py, tuners/through_peft.py): ``lorafuse merge``
gives what PEFT's ``merge_and_unload()`` gives for the trained model, tensor by tensor, for every registered
through-PEFT tuner type on every layer kind it lists; the layer type is established or the merge refused; without
torch/peft the error names the extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import read_tensors
from peft import PeftConfig
from torch import nn
from tuner_helpers import save_module, tiny_lm, train_and_save

import lorafuse.tuners.peft_layer as peft_layer
from lorafuse.cli import main
from lorafuse.tuners import registered_tuners, tuner_of
from lorafuse.tuners.through_peft import THROUGH_PEFT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

QWEN_TARGETS = ["q_proj", "down_proj"]  # square 32x32 and 32x64
GPT2_TARGETS = ["c_attn", "c_proj"]  # Conv1D (32, 96) and square (32, 32)

# peft_type -> config kwargs (beyond target_modules) with sizes that fit 32/64-wide layers
CONFIGS: dict[str, dict] = {
    "C3A": dict(block_size=16),
    "WAVEFT": dict(n_frequency=24),
    "ROAD": dict(group_size=8),
    "VBLORA": dict(num_vectors=16, vector_length=8, r=4),
    "RANDLORA": dict(r=8),
    "OSF": dict(),
    "GRALORA": dict(r=8, gralora_k=2),
    "PEANUT": dict(r=4),
    "DELORA": dict(r=4),
    "PSOFT": dict(r=4),
    "SUPERTUNING": dict(),
    "DEFT": dict(),
    "FROD": dict(),
    "GLORA": dict(r=4),
    "HIRA": dict(r=4),
    "ADAMSS": dict(r=4),
    "UNILORA": dict(r=4, save_indices=True),
    "TINYLORA": dict(r=4, u=8, weight_tying=1.0),
}
BIAS_TUNERS = {"ROAD", "GLORA", "ADAMSS"}  # their merge changes the bias: tested on Qwen2 (biased q/k/v)


def _merge(base: Path, adapter: Path, out: Path, *extra: str, more: tuple[Path, ...] = ()) -> dict[str, torch.Tensor]:
    adapters = [str(adapter), *map(str, more)]
    assert main(["merge", str(base), *adapters, "-o", str(out), "--dtype", "float32", *extra]) == 0
    return read_tensors(out)


def _assert_parity(
    merged: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tol: float
) -> None:
    changed = 0
    for name, expected in oracle.items():
        if name not in base:  # a tied head (GPT-2's lm_head): the base does not store it either
            continue
        assert name in merged, f"{name} missing from the merge"
        got = merged[name]
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, atol=tol, rtol=0), f"{name}: {(got - expected).abs().max():.3g}"
        if name in base and not torch.equal(base[name], expected):
            changed += 1
    assert changed, "the adapter changed nothing: the test proves nothing"


def _config(peft_type: str, targets: list[str]) -> PeftConfig:
    return PeftConfig.from_peft_type(peft_type=peft_type, target_modules=targets, **CONFIGS[peft_type])


def _needs(peft_type: str) -> None:
    if peft_type == "ADAMSS":
        pytest.importorskip("sklearn", reason="PEFT's AdaMSS needs scikit-learn")


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_linear_parity(tmp_path: Path, peft_type: str) -> None:
    """Qwen3 (Qwen2 for the tuners that change biases): PEFT's merge on Linear layers, square and not."""
    _needs(peft_type)
    from transformers import AutoModelForCausalLM

    folder = tiny_lm(tmp_path, "qwen2" if peft_type in BIAS_TUNERS else "qwen3")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = ["q_proj", "v_proj"] if peft_type in BIAS_TUNERS else QWEN_TARGETS
    oracle = train_and_save(base, _config(peft_type, targets), tmp_path / "adapter")
    merged = _merge(folder, tmp_path / "adapter", tmp_path / "out")
    _assert_parity(merged, oracle, read_tensors(folder), 2e-5)
    if peft_type in BIAS_TUNERS:
        key = "model.layers.0.self_attn.q_proj.bias"
        assert not torch.equal(merged[key], read_tensors(folder)[key]), "the tuner's bias change was not merged"


CONV1D_TUNERS = sorted(t for t, entry in THROUGH_PEFT.items() if "gpt2_conv1d" in entry[2])


@pytest.mark.parametrize("peft_type", CONV1D_TUNERS)
def test_gpt2_conv1d_parity(tmp_path: Path, peft_type: str) -> None:
    """GPT-2's Conv1D layers (weights stored (in, out); c_proj square): PEFT's merge, from the base's config."""
    from transformers import GPT2LMHeadModel

    folder = tiny_lm(tmp_path, "gpt2")
    base = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    oracle = train_and_save(base, _config(peft_type, GPT2_TARGETS), tmp_path / "adapter")
    merged = _merge(folder, tmp_path / "adapter", tmp_path / "out")
    _assert_parity(merged, oracle, read_tensors(folder), 2e-5)


class TinyNet(nn.Module):
    """Every layer kind HiRA takes, in a model transformers cannot load (saved as a bare safetensors file)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.c1 = nn.Conv1d(4, 8, 3)
        self.c2 = nn.Conv2d(4, 8, (3, 2))
        self.c3 = nn.Conv3d(4, 6, 2)
        self.fc = nn.Linear(16, 24)


def test_hira_every_layer_kind(tmp_path: Path) -> None:
    """HiRA on Embedding, Conv1d/2d/3d and Linear layers of a base without config.json: the conv shapes and the
    saved embedding tensors establish those layers, --conv1d-modules none the Linear one."""
    torch.manual_seed(0)
    net = TinyNet()
    folder = save_module(net, tmp_path / "net")
    oracle = train_and_save(net, _config("HIRA", ["embed", "c1", "c2", "c3", "fc"]), tmp_path / "adapter")
    merged = _merge(folder, tmp_path / "adapter", tmp_path / "out", "--conv1d-modules", "none")
    _assert_parity(merged, oracle, read_tensors(folder), 2e-5)
    assert all(not torch.equal(merged[f"{m}.weight"], net.state_dict()[f"{m}.weight"]) for m in ("embed", "c3", "fc"))


def test_square_layer_of_unknown_type_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tuner PEFT runs on both Linear and Conv1D layers, on a base without config.json: a Linear and a Conv1D
    layer merge differently, so without --conv1d-modules the merge is refused with the fix."""
    torch.manual_seed(0)
    net = TinyNet()
    folder = save_module(net, tmp_path / "net")
    train_and_save(net, _config("VBLORA", ["fc"]), tmp_path / "adapter")
    code = main(["merge", str(folder), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Linear or a GPT-2 Conv1D" in err and "--conv1d-modules" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_two_tuner_types_in_sequence(tmp_path: Path) -> None:
    """A RoAd adapter (weight and bias) then a C3A adapter on the same layer: PEFT merges the second on the
    first's merged layer, and so does lorafuse."""
    from transformers import AutoModelForCausalLM

    folder = tiny_lm(tmp_path, "qwen2")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    first = train_and_save(base, _config("ROAD", ["q_proj"]), tmp_path / "road")
    once = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    once.load_state_dict(first)
    both = train_and_save(once, _config("C3A", ["q_proj", "k_proj"]), tmp_path / "c3a")
    merged = _merge(folder, tmp_path / "road", tmp_path / "out", more=(tmp_path / "c3a",))
    _assert_parity(merged, both, read_tensors(folder), 2e-5)


def test_reading_a_tensor_an_earlier_adapter_changed_is_refused(tmp_path: Path, capsys) -> None:
    """GLoRA's merged bias is computed from the layer's weight: after a RoAd adapter changed that weight, reading
    it as stored would be wrong, so the merge is refused with the fix (merge it first, or alone)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_lm(tmp_path, "qwen2")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    train_and_save(base, _config("ROAD", ["q_proj"]), tmp_path / "road")
    train_and_save(base, _config("GLORA", ["q_proj"]), tmp_path / "glora")
    capsys.readouterr()
    code = main(["merge", str(folder), str(tmp_path / "road"), str(tmp_path / "glora"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "is computed from" in err and "merge this adapter first, or alone" in err
    assert not (tmp_path / "out").exists()


def test_strength_moves_part_of_the_way(tmp_path: Path) -> None:
    """--weight 0.5 on a through-PEFT merge: halfway from the base to PEFT's merge, bias included."""
    from transformers import AutoModelForCausalLM

    folder = tiny_lm(tmp_path, "qwen2")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    oracle = train_and_save(base, _config("ROAD", ["q_proj"]), tmp_path / "adapter")
    merged = _merge(folder, tmp_path / "adapter", tmp_path / "out", "--weight", "0.5")
    stored = read_tensors(folder)
    for part in ("weight", "bias"):
        key = f"model.layers.0.self_attn.q_proj.{part}"
        halfway = stored[key] + 0.5 * (oracle[key] - stored[key])
        assert torch.allclose(merged[key], halfway, atol=2e-5), key
        assert not torch.equal(merged[key], stored[key])


def test_missing_extra_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without torch or peft, a through-PEFT merge fails with one line naming the extra and the tuner."""
    from transformers import AutoModelForCausalLM

    folder = tiny_lm(tmp_path, "qwen3")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    train_and_save(base, _config("C3A", ["q_proj"]), tmp_path / "adapter")
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    capsys.readouterr()
    code = main(["merge", str(folder), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert peft_layer.PEFT_EXTRA in err[0] and "C3A" in err[0]


def test_every_through_peft_tuner_is_registered() -> None:
    """Each table entry is registered as merged through PEFT, with the layers its tests cover."""
    for peft_type, (_params, _shared, layers, bias, _what) in THROUGH_PEFT.items():
        tuner = tuner_of(peft_type)
        assert tuner is not None and tuner.how == "peft", peft_type
        assert tuner.extra["layers"] == layers and tuner.extra["bias"] == bias
        assert set(layers) <= set(peft_layer.LAYER_KINDS)
    assert {t.peft_type for t in registered_tuners() if t.how == "peft"} == set(THROUGH_PEFT)
    assert set(CONFIGS) == set(THROUGH_PEFT)  # every one has a parity test on Linear layers


def _qwen3_adapter(tmp_path: Path, peft_type: str, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    folder = tiny_lm(tmp_path, "qwen3")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = PeftConfig.from_peft_type(
        peft_type=peft_type, target_modules=["q_proj"], **{**CONFIGS[peft_type], **overrides}
    )
    train_and_save(base, config, tmp_path / "adapter")
    return folder


def _one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_unilora_without_saved_indices_is_refused(tmp_path: Path, capsys) -> None:
    """UniLoRA saved without its indices: PEFT draws new random ones on load, so nothing reproduces the trained
    model; refused by name with the fix."""
    folder = _qwen3_adapter(tmp_path, "UNILORA", save_indices=False)
    err = _one_line_error(["merge", str(folder), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")], capsys)
    assert "UNILORA" in err and "save_indices" in err


def test_adapter_and_config_that_disagree_are_one_line(tmp_path: Path, capsys) -> None:
    """A C3A adapter whose config's block_size was changed after saving: PEFT's layer cannot take its kernels,
    and the merge stops with one line naming the module (nothing written)."""
    folder = _qwen3_adapter(tmp_path, "C3A")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["block_size"] = 8
    config_path.write_text(json.dumps(config))
    err = _one_line_error(["merge", str(folder), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")], capsys)
    assert "C3A" in err and "q_proj" in err
    assert not (tmp_path / "out").exists()


def test_tinylora_with_a_vector_per_layer_is_refused(tmp_path: Path, capsys) -> None:
    """TinyLoRA with weight_tying=0 gives each layer its own vector by its place among all targeted layers of the
    model, which a one-module merge cannot tell: refused by name with the fix."""
    from transformers import AutoModelForCausalLM

    folder = tiny_lm(tmp_path, "qwen3")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = PeftConfig.from_peft_type(peft_type="TINYLORA", target_modules=QWEN_TARGETS, r=4, u=8, weight_tying=0.0)
    train_and_save(base, config, tmp_path / "adapter")
    err = _one_line_error(["merge", str(folder), str(tmp_path / "adapter"), "-o", str(tmp_path / "out")], capsys)
    assert "TINYLORA" in err and "weight_tying=1.0" in err


def test_layer_kind_the_tuner_does_not_take_is_refused(tmp_path: Path, capsys) -> None:
    """C3A takes Linear layers only: told that q_proj is a GPT-2 Conv1D layer, the merge is refused rather than
    running a Linear merge on a (in, out) weight."""
    folder = _qwen3_adapter(tmp_path, "C3A")
    argv = ["merge", str(folder), str(tmp_path / "adapter"), "-o", str(tmp_path / "out"), "--conv1d-modules", "q_proj"]
    err = _one_line_error(argv, capsys)
    assert "GPT-2 Conv1D" in err and "C3A" in err
