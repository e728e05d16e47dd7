"""Natively merged PEFT tuners of their own modules (FourierFT, SHiRA, trainable tokens, LN tuning, BEFT) against
PEFT's ``merge_and_unload()``, the tuner types nobody can merge refused by name, and docs/tuners.md matching the
registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_model, read_tensors
from peft import PeftConfig, get_peft_model
from peft.utils import PeftType
from safetensors.torch import save_file
from torch import nn
from tuner_helpers import save_module, tiny_lm, train_and_save

from lorafuse.cli import main
from lorafuse.tuners import registered_tuners, tuner_of
from lorafuse.tuners.refused import REFUSED

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "tuners.md"


def _merge(base: Path, adapter: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert main(["merge", str(base), str(adapter), "-o", str(out), "--dtype", "float32", *extra]) == 0
    return read_tensors(out)


def _assert_parity(merged: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    changed = []
    for name, stored in base.items():
        expected = oracle[name]
        assert torch.allclose(merged[name], expected, atol=2e-5, rtol=0), (
            f"{name}: {(merged[name] - expected).abs().max()}"
        )
        if not torch.equal(stored, expected):
            changed.append(name)
    assert changed, "the adapter changed nothing: the test proves nothing"
    return changed


# (peft_type, base model type, config kwargs)
NATIVE_CASES = {
    "fourierft-linear": ("FOURIERFT", "qwen3", dict(target_modules=["q_proj", "down_proj"], n_frequency=40)),
    "fourierft-conv1d": ("FOURIERFT", "gpt2", dict(target_modules=["c_attn", "c_proj"], n_frequency=40, scaling=3.0)),
    "shira": ("SHIRA", "qwen3", dict(target_modules=["q_proj", "down_proj"], r=2)),
    "trainable-tokens": ("TRAINABLE_TOKENS", "qwen3", dict(target_modules=["embed_tokens"], token_indices=[0, 5, 77])),
    "ln-tuning": ("LN_TUNING", "qwen2", dict(target_modules=["input_layernorm", "norm"])),
    "beft": ("BEFT", "qwen2", dict(target_modules=["q_proj", "v_proj"])),
}


@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_native_parity(tmp_path: Path, case: str) -> None:
    """Each natively merged tuner gives PEFT's merge_and_unload() of the trained model, through the CLI."""
    peft_type, model_type, kwargs = NATIVE_CASES[case]
    folder = tiny_lm(tmp_path, model_type)
    oracle = train_and_save(
        load_model(folder), PeftConfig.from_peft_type(peft_type=peft_type, **kwargs), tmp_path / "a"
    )
    assert tuner_of(peft_type).how == "native"
    changed = _assert_parity(_merge(folder, tmp_path / "a", tmp_path / "out"), oracle, read_tensors(folder))
    if peft_type == "LN_TUNING":  # RMSNorm: a weight only; every targeted norm replaced
        assert set(changed) == {"model.norm.weight", "model.layers.0.input_layernorm.weight"}


def test_fourierft_needs_torch_for_its_positions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """FourierFT's frequency positions come from torch's generator: without torch, one line naming the extra."""
    import builtins

    folder = tiny_lm(tmp_path, "qwen3")
    config = PeftConfig.from_peft_type(peft_type="FOURIERFT", target_modules=["q_proj"], n_frequency=10)
    train_and_save(load_model(folder), config, tmp_path / "a")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    capsys.readouterr()
    code = main(["merge", str(folder), str(tmp_path / "a"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "FourierFT" in err[0] and "lorafuse[torch]" in err[0], err


def test_fourierft_on_a_layer_of_unknown_type_is_refused(tmp_path: Path, capsys) -> None:
    """FourierFT's positions differ between a Linear and a Conv1D layer of one shape: a base without config.json
    is refused with the fix, and --conv1d-modules none settles it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20))
    folder = save_module(net, tmp_path / "net")
    config = PeftConfig.from_peft_type(peft_type="FOURIERFT", target_modules=["0"], n_frequency=30, scaling=2.0)
    oracle = train_and_save(net, config, tmp_path / "a")
    capsys.readouterr()
    assert main(["merge", str(folder), str(tmp_path / "a"), "-o", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert "Linear and GPT-2 Conv1D" in err and "config.json" in err
    merged = _merge(folder, tmp_path / "a", tmp_path / "out", "--conv1d-modules", "none")
    _assert_parity(merged, oracle, read_tensors(folder))


def test_prompt_tuning_adapter_is_refused(tmp_path: Path, capsys) -> None:
    """A real PEFT prompt-tuning adapter: refused with one line naming the tuner and why."""
    from peft import PromptTuningConfig

    folder = tiny_lm(tmp_path, "qwen3")
    model = get_peft_model(load_model(folder), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "a")
    capsys.readouterr()
    assert main(["merge", str(folder), str(tmp_path / "a"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PROMPT_TUNING" in err[0] and "nothing to merge" in err[0], err


@pytest.mark.parametrize("peft_type", sorted(REFUSED))
def test_unmergeable_tuner_types_are_refused_by_name(tmp_path: Path, peft_type: str, capsys) -> None:
    """Every registered refusal: exit 1, one line with the tuner's name and the reason, no output."""
    folder = tiny_lm(tmp_path, "qwen3")
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "target_modules": ["q_proj"]}))
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.x": torch.ones(2)}, adapter / "adapter_model.safetensors"
    )
    capsys.readouterr()
    assert main(["merge", str(folder), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and peft_type in err[0] and REFUSED[peft_type] in err[0], err
    assert not (tmp_path / "out").exists()


def test_every_peft_tuner_type_is_registered() -> None:
    """Every tuner type of the installed PEFT is merged natively, through PEFT, or refused by name."""
    registered = {t.peft_type for t in registered_tuners()}
    missing = sorted({p.value for p in PeftType} - registered)
    assert not missing, f"PEFT tuner types lorafuse does not register: {missing}"
    assert {t.how for t in registered_tuners()} <= {"native", "peft", "refused"}


def test_docs_table_matches_the_registry() -> None:
    """docs/tuners.md holds the table generated from the registry (python -m lorafuse.tuners.table)."""
    from lorafuse.tuners.table import tuner_table

    assert tuner_table() in DOCS.read_text(), "docs/tuners.md is out of date: python -m lorafuse.tuners.table"


def test_torch_kernel_computes_what_the_numpy_kernel_computes(tmp_path: Path) -> None:
    """The CUDA kernel's torch path (run here on the CPU) gives the numpy kernel's result for the native FourierFT
    and SHiRA updates and a through-PEFT (RoAd) module, weight and bias."""
    from lorafuse.engine.cuda import CudaMerger
    from lorafuse.engine.kernel import RowMerger, tensor_array
    from lorafuse.formats import read_adapter
    from lorafuse.io.checkpoint import Checkpoint
    from lorafuse.plan import build_plan

    folder = tiny_lm(tmp_path, "qwen2")
    configs = {
        "fourierft": dict(peft_type="FOURIERFT", target_modules=["q_proj"], n_frequency=30),
        "shira": dict(peft_type="SHIRA", target_modules=["k_proj"], r=2),
        "road": dict(peft_type="ROAD", target_modules=["v_proj"], group_size=8),
    }
    for name, kwargs in configs.items():
        train_and_save(load_model(folder), PeftConfig.from_peft_type(**kwargs), tmp_path / name)
    base = Checkpoint(sorted(folder.glob("*.safetensors")))
    adapters = [read_adapter(tmp_path / name) for name in configs]
    config = json.loads((folder / "config.json").read_text())
    plan = build_plan(base, adapters, base_config=config)
    touched = plan.touched
    assert len(touched) == 4  # q, k, v weights and v's bias
    for out in touched:
        on_numpy = tensor_array(out, RowMerger(plan).merge)
        on_torch = tensor_array(out, CudaMerger(plan, "cpu").merge)
        assert np.allclose(on_numpy, on_torch, atol=1e-6, rtol=0), out.name
        assert not np.array_equal(on_numpy, base.array(out.source)), out.name
