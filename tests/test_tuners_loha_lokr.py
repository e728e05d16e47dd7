"""PEFT LoHa and LoKr adapters merge as PEFT's ``merge_and_unload()`` merges them: every layer type PEFT wraps
(Linear, Conv1d, Conv2d with and without effective conv2d / Tucker cores), every LoKr factorisation (w1 and w2
whole or low-rank, decompose_both, Tucker w2), rank and alpha patterns, ``--weight``, adapters of different tuner
types in sequence, and a tiny Qwen3. PEFT initialises some factors to zero: every adapter parameter is randomised
before saving, so a dropped or misplaced factor changes the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import input_ids
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from tuner_helpers import load_module, peft_merged_in_turn, save_module

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import AdapterError

ATOL = 1e-5


class LayerZoo(nn.Module):
    """Every layer type PEFT wraps with LoHa/LoKr, with widths whose factorisations differ (LoKr's kron)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(24, 36)  # LoKr: 36 = 6 x 6, 24 = 4 x 6
        self.square = nn.Linear(16, 16)
        self.odd = nn.Linear(12, 10)  # 10 = 2 x 5: rank 2 < 5/2 -> w2 low-rank
        self.conv1 = nn.Conv1d(12, 20, 3, padding=1)
        self.point1 = nn.Conv1d(20, 12, 1)  # kernel 1: PEFT never uses effective conv for it
        self.conv2 = nn.Conv2d(12, 18, 3, padding=1)
        self.point2 = nn.Conv2d(18, 12, 1)
        self.grouped = nn.Conv2d(12, 18, 3, groups=3)  # PEFT wraps it too: its weight is (18, 4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


ZOO_MODULES = ["lin", "square", "odd", "conv1", "point1", "conv2", "point2", "grouped"]


def _save_zoo(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    zoo = LayerZoo()
    return save_module(zoo, folder)


def _randomize_all(model: nn.Module, seed: int) -> None:
    """Every adapter parameter (LoRA, LoHa, LoKr) off its initial value: zeros included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and any(m in name for m in ("hada_", "lokr_", "lora_")):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif param.requires_grad and "modules_to_save" in name:  # a trained copy, off the base's values
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _make_adapter(base: nn.Module, config, out: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    _randomize_all(model, seed)
    model.save_pretrained(out)
    return out


def _assert_same(merged_dir: Path, expected: dict[str, torch.Tensor], changed: list[str]) -> None:
    got = {}
    for path in sorted(merged_dir.glob("*.safetensors")):
        got.update(load_file(path))
    assert set(got) == set(expected)
    for name in changed:  # the targets really moved (a no-op merge must not pass)
        assert name in got
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=ATOL, atol=ATOL, msg=name)


def _moved(base_dir: Path, expected: dict[str, torch.Tensor]) -> list[str]:
    base = load_file(base_dir / "model.safetensors")
    moved = [k for k in base if not torch.equal(base[k], expected[k])]
    assert moved, "the adapter must change the base"
    return moved


ZOO_CASES = {
    "loha-linear-conv": LoHaConfig(target_modules=ZOO_MODULES, r=3, alpha=5, init_weights=False),
    "loha-effective-conv": LoHaConfig(
        target_modules=ZOO_MODULES, r=2, alpha=3, use_effective_conv2d=True, init_weights=False
    ),
    "loha-patterns": LoHaConfig(
        target_modules=ZOO_MODULES,
        r=4,
        alpha=6,
        rank_pattern={"conv2": 2, "lin": 5},
        alpha_pattern={"square": 1.5, "conv1": 7},
        init_weights=False,
    ),
    "loha-modules-to-save": LoHaConfig(
        target_modules=["lin", "conv1", "conv2"], r=2, alpha=3, modules_to_save=["point2"], init_weights=False
    ),
    "lokr-default": LoKrConfig(target_modules=ZOO_MODULES, r=2, alpha=4, init_weights=False),
    "lokr-full-w2": LoKrConfig(target_modules=ZOO_MODULES, r=8, alpha=4, init_weights=False),
    "lokr-decompose-both": LoKrConfig(target_modules=ZOO_MODULES, r=1, alpha=3, decompose_both=True),
    "lokr-decompose-both-full": LoKrConfig(target_modules=ZOO_MODULES, r=6, alpha=2, decompose_both=True),
    "lokr-effective-conv": LoKrConfig(
        target_modules=ZOO_MODULES, r=2, alpha=5, use_effective_conv2d=True, decompose_both=True
    ),
    "lokr-decompose-factor": LoKrConfig(target_modules=ZOO_MODULES, r=2, alpha=4, decompose_factor=2),
    "lokr-patterns-dropout-scale": LoKrConfig(
        target_modules=ZOO_MODULES,
        r=2,
        alpha=4,
        rank_pattern={"conv1": 8, "lin": 1},
        alpha_pattern={"odd": 9},
        rank_dropout_scale=True,
        rank_dropout=0.1,
    ),
}


def _forms(adapter: Path) -> set[str]:
    """The parameter names (``hada_t1``, ``lokr_w2_a``, ...) an adapter saved."""
    return {key.rsplit(".", 1)[-1] for key in load_file(adapter / "adapter_model.safetensors")}


@pytest.mark.parametrize("case", list(ZOO_CASES))
def test_zoo_matches_peft(case, tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(load_module(LayerZoo(), base_dir), ZOO_CASES[case], tmp_path / "adapter")
    out = tmp_path / "merged"
    report = lorafuse.merge(base_dir, [adapter], out, dtype="fp32")
    assert report.warnings == []
    expected = peft_merged_in_turn(load_module(LayerZoo(), base_dir), [adapter])
    _assert_same(out, expected, _moved(base_dir, expected))


def test_zoo_cases_reach_every_form(tmp_path):
    """The cases above cover each saved form: LoHa's Tucker cores, LoKr's whole and low-rank w1 and w2, its
    Tucker w2 (a test that never reaches a form cannot fail on it)."""
    seen: set[str] = set()
    for i, (case, config) in enumerate(ZOO_CASES.items()):
        base_dir = _save_zoo(tmp_path / f"base{i}")
        seen |= _forms(_make_adapter(load_module(LayerZoo(), base_dir), config, tmp_path / case))
    wanted = {"hada_w1_a", "hada_t1", "lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a", "lokr_t2"}
    assert wanted <= seen


def test_weight_half_through_cli(tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    config = LoKrConfig(target_modules=ZOO_MODULES, r=2, alpha=4, decompose_both=True, use_effective_conv2d=True)
    adapter = _make_adapter(load_module(LayerZoo(), base_dir), config, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", str(base_dir), str(adapter), "-o", str(out), "--dtype", "fp32", "--weight", "0.5"]) == 0
    expected = peft_merged_in_turn(load_module(LayerZoo(), base_dir), [adapter], [0.5])
    _assert_same(out, expected, _moved(base_dir, expected))


@pytest.mark.parametrize(
    "configs",
    [
        pytest.param(
            [
                LoHaConfig(target_modules=["lin", "conv2"], r=2, alpha=3, use_effective_conv2d=True),
                LoKrConfig(target_modules=["lin", "conv1", "conv2"], r=2, alpha=5, decompose_both=True),
            ],
            id="loha-then-lokr",
        ),
        pytest.param(
            [
                LoraConfig(target_modules=["lin", "odd", "conv2"], r=3, lora_alpha=6, init_lora_weights=False),
                LoHaConfig(target_modules=["lin", "square", "odd", "conv2"], r=2, alpha=3),
            ],
            id="lora-then-loha",
        ),
    ],
)
def test_two_tuner_types_in_sequence(configs, tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    adapters = [
        _make_adapter(load_module(LayerZoo(), base_dir), config, tmp_path / f"adapter{i}", seed=i + 1)
        for i, config in enumerate(configs)
    ]
    out = tmp_path / "merged"
    lorafuse.merge(base_dir, adapters, out, dtype="fp32", weights=[1.0, 0.7])
    expected = peft_merged_in_turn(load_module(LayerZoo(), base_dir), adapters, [1.0, 0.7])
    _assert_same(out, expected, _moved(base_dir, expected))


def _make_qwen3(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(LoHaConfig(target_modules=QWEN_TARGETS, r=4, alpha=8), id="loha"),
        pytest.param(LoKrConfig(target_modules=QWEN_TARGETS, r=2, alpha=4, decompose_both=True), id="lokr"),
        pytest.param(LoKrConfig(target_modules=QWEN_TARGETS, r=16, alpha=4), id="lokr-whole"),
    ],
)
def test_qwen3_matches_peft(config, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = _make_qwen3(tmp_path / "qwen3")

    def load():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    adapter = _make_adapter(load(), config, tmp_path / "adapter")
    out = tmp_path / "merged"
    lorafuse.merge(base_dir, [adapter], out, dtype="fp32")
    expected_model = PeftModel.from_pretrained(load(), adapter).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected_model(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, load()(ids).logits, atol=1e-3)  # the adapter does something


def test_lokr_rank_disagreeing_with_config_is_refused(tmp_path):
    """A factor saved whole carries no rank: a config whose r could not have saved it whole is refused, never
    used for alpha/r."""
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(
        load_module(LayerZoo(), base_dir), LoKrConfig(target_modules=["lin"], r=8, alpha=4), tmp_path / "adapter"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 1
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="whole only when r >="):
        lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")


def test_loha_rank_disagreeing_with_config_is_refused(tmp_path):
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(
        load_module(LayerZoo(), base_dir), LoHaConfig(target_modules=["lin"], r=4, alpha=4), tmp_path / "adapter"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"lin": 3}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="has rank 4 but adapter_config.json gives r=3"):
        lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")


@pytest.mark.parametrize("block_bytes", [1, 4 * 7 * 5])
@pytest.mark.parametrize("case", ["loha-effective-conv", "lokr-full-w2", "lokr-effective-conv", "lokr-default"])
def test_row_blocks_straddling_kron_rows(case, block_bytes, tmp_path, monkeypatch):
    """Blocks of one row and of a few rows (splitting LoKr's kron row groups and every conv kernel) give PEFT's
    merge: each block builds only its rows' share of the update."""
    from lorafuse.engine import kernel

    monkeypatch.setattr(kernel, "ROW_BLOCK_BYTES", block_bytes)
    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(load_module(LayerZoo(), base_dir), ZOO_CASES[case], tmp_path / "adapter")
    lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")
    expected = peft_merged_in_turn(load_module(LayerZoo(), base_dir), [adapter])
    _assert_same(tmp_path / "merged", expected, _moved(base_dir, expected))


@pytest.mark.parametrize("case", ["loha-effective-conv", "loha-patterns", "lokr-full-w2", "lokr-effective-conv"])
def test_torch_ops_match_numpy_block_by_block(case, tmp_path):
    """The CUDA kernel and the runtime apply the same edits through TorchOps: row blocks of 3 give the numpy
    kernel's values (here on the CPU)."""
    from lorafuse.edits import BlockOps
    from lorafuse.engine.cuda import TorchOps
    from lorafuse.formats import read_adapter

    base_dir = _save_zoo(tmp_path / "base")
    adapter = _make_adapter(load_module(LayerZoo(), base_dir), ZOO_CASES[case], tmp_path / "adapter")
    base = load_file(base_dir / "model.safetensors")
    for targeted in read_adapter(adapter).edits:
        weight = base[targeted.target].reshape(base[targeted.target].shape[0], -1)
        expected = weight.numpy().copy()
        targeted.edit.apply(expected, slice(0, len(expected)), BlockOps())
        got, ops = weight.clone(), TorchOps("cpu")
        for start in range(0, len(got), 3):
            rows = slice(start, min(start + 3, len(got)))
            targeted.edit.apply(got[rows], rows, ops)
        assert not np.allclose(expected, weight.numpy())
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_merge_verify_both_tuner_types(tmp_path, capsys):
    """``merge --verify``: the weight check (numpy kernel) and the output check (the runtime on a live Qwen3)
    pass for a LoHa and a LoKr adapter merged in sequence."""
    from transformers import AutoModelForCausalLM

    base_dir = _make_qwen3(tmp_path / "qwen3")
    adapters = []
    for i, config in enumerate(
        [
            LoHaConfig(target_modules=QWEN_TARGETS, r=2, alpha=3),
            LoKrConfig(target_modules=QWEN_TARGETS, r=2, alpha=4, decompose_both=True),
        ]
    ):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        adapters.append(_make_adapter(model, config, tmp_path / f"adapter{i}", seed=i + 3))
    out = tmp_path / "merged"
    assert main(["merge", str(base_dir), *map(str, adapters), "-o", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "top-1 agreement 100.0%" in text


def test_inspect_norms_are_peft_updates(tmp_path, capsys):
    """inspect names the tuner, and its ||dW||_F per module is the norm of PEFT's merged change."""
    base_dir = _save_zoo(tmp_path / "base")
    for case in ("loha-effective-conv", "loha-linear-conv", "lokr-effective-conv", "lokr-full-w2"):
        adapter = _make_adapter(load_module(LayerZoo(), base_dir), ZOO_CASES[case], tmp_path / case)
        assert main(["inspect", str(adapter), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        tuner = "LOHA" if case.startswith("loha") else "LOKR"
        assert report["tuner"] == tuner
        expected = peft_merged_in_turn(load_module(LayerZoo(), base_dir), [adapter])
        base = load_file(base_dir / "model.safetensors")
        rows = {row["target"]: row for row in report["modules"]}
        assert set(rows) == {f"{m}.weight" for m in ZOO_MODULES}
        for target, row in rows.items():
            assert row["kind"] == tuner.lower()
            change = float(torch.linalg.vector_norm((expected[target] - base[target]).double()))
            assert row["norm"] == pytest.approx(change, rel=1e-4), (case, target)
        assert main(["inspect", str(adapter)]) == 0
        assert f"tuner        {tuner}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(LoHaConfig(target_modules=["lin", "conv2"], r=2, alpha=3, init_weights=True), id="loha"),
        pytest.param(LoKrConfig(target_modules=["lin", "conv2"], r=2, alpha=3, init_weights=True), id="lokr"),
    ],
)
def test_untrained_adapter_warns_it_changes_nothing(config, tmp_path):
    """PEFT's own initialisation leaves one factor at zero: the merge says so, and the base comes back."""
    base_dir = _save_zoo(tmp_path / "base")
    torch.manual_seed(0)
    get_peft_model(load_module(LayerZoo(), base_dir), config).save_pretrained(tmp_path / "adapter")
    report = lorafuse.merge(base_dir, [tmp_path / "adapter"], tmp_path / "merged", dtype="fp32")
    assert any("changes nothing" in w for w in report.warnings)
    merged, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert set(merged) == set(base)
    for name, value in base.items():
        assert torch.equal(merged[name], value), name


def _edit_adapter(adapter: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None) -> None:
    """Rewrite a saved adapter: drop the tensors whose names end with ``drop``, add ``add``."""
    path = adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if drop is None or not k.endswith(drop)}
    save_file({**tensors, **(add or {})}, path)


def _zoo_adapter(tmp_path: Path, config) -> tuple[Path, Path]:
    base_dir = _save_zoo(tmp_path / "base")
    return base_dir, _make_adapter(load_module(LayerZoo(), base_dir), config, tmp_path / "adapter")


@pytest.mark.parametrize(
    ("config", "drop", "add", "message"),
    [
        (LoHaConfig(target_modules=["lin"]), "lin.hada_w2_b", None, "no hada_w2_b tensor"),
        (
            LoHaConfig(target_modules=["conv2"], use_effective_conv2d=True),
            "conv2.hada_t2",
            None,
            "one Tucker core",
        ),
        (LoKrConfig(target_modules=["lin"], r=8), "lin.lokr_w2", None, "neither lokr_w2 nor lokr_w2_a"),
        (
            LoKrConfig(target_modules=["lin"], r=8),
            None,
            {"base_model.model.lin.lokr_w1_a": torch.ones(6, 2)},
            "both whole and in parts",
        ),
        (
            LoHaConfig(target_modules=["lin"], r=2),
            "lin.hada_w1_b",
            {"base_model.model.lin.hada_w1_b": torch.ones(3, 24)},
            "no low-rank pair",
        ),
    ],
    ids=["loha-missing", "loha-one-core", "lokr-missing", "lokr-whole-and-parts", "loha-rank-mismatch"],
)
def test_broken_adapter_files_are_refused(config, drop, add, message, tmp_path):
    base_dir, adapter = _zoo_adapter(tmp_path, config)
    _edit_adapter(adapter, drop, add)
    with pytest.raises(AdapterError, match=message):
        lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("alpha", "8", "alpha is '8', not a number"),
        ("alpha", float("nan"), "not a finite number"),
        ("r", 0, "r is 0, not a whole number of at least 1"),
        ("rank_pattern", {"lin": 2.5}, "rank_pattern\\['lin'\\] is 2.5"),
        ("alpha_pattern", ["lin"], "alpha_pattern must map module names"),
        ("decompose_both", "yes", "decompose_both must be true or false"),
        ("rank_dropout_scale", 1, "rank_dropout_scale must be true or false"),
    ],
)
def test_bad_config_values_are_one_line_errors(key, value, message, tmp_path):
    base_dir, adapter = _zoo_adapter(tmp_path, LoKrConfig(target_modules=["lin"], r=2))
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")


def test_gpt2_conv1d_target_is_refused(gpt2, tmp_path):
    """PEFT cannot wrap GPT-2's Conv1D with LoHa/LoKr: an update aimed at one is refused, never oriented by
    guess (c_proj is square: both orientations fit)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["c_proj"]})
    )
    prefix = "base_model.model.transformer.h.0.attn.c_proj."
    gen = torch.Generator().manual_seed(0)
    save_file(
        {
            prefix + "hada_w1_a": torch.randn(32, 2, generator=gen),
            prefix + "hada_w1_b": torch.randn(2, 32, generator=gen),
            prefix + "hada_w2_a": torch.randn(32, 2, generator=gen),
            prefix + "hada_w2_b": torch.randn(2, 32, generator=gen),
        },
        adapter / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterError, match="GPT-2 Conv1D layer, which PEFT's LoHa cannot wrap"):
        lorafuse.merge(gpt2, [adapter], tmp_path / "merged", dtype="fp32")


def test_combine_refuses_lycoris_updates(tmp_path, capsys):
    """A LoRA adapter cannot hold a LoHa update: combine refuses it, naming the tensor, instead of dropping it."""
    base_dir, adapter = _zoo_adapter(tmp_path, LoHaConfig(target_modules=["lin"], r=2))
    assert main(["combine", str(adapter), str(adapter), "-o", str(tmp_path / "combined")]) != 0
    assert "lin.hada_w1_a' is a loha update, which one LoRA adapter cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "combined").exists()


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3"])
@pytest.mark.parametrize("rank", [2, 16])
def test_bench_tuner_adapters_are_what_peft_saves(kind, rank, tmp_path):
    """bench/tuner_adapters.py writes adapters PEFT loads without missing or unexpected keys, and lorafuse's merge
    of them is PEFT's (on the tiny Qwen3, shaped by the bench's builder)."""
    import sys
    import warnings

    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from tuner_adapters import build_tuner_adapter

    base_dir = _make_qwen3(tmp_path / "qwen3")
    shapes = {
        "self_attn.q_proj": (32, 32),
        "self_attn.k_proj": (16, 32),
        "self_attn.v_proj": (16, 32),
        "self_attn.o_proj": (32, 32),
        "mlp.gate_proj": (48, 32),
        "mlp.up_proj": (48, 32),
        "mlp.down_proj": (32, 48),
    }
    adapter = build_tuner_adapter(kind, tmp_path / "adapter", shapes, 2, rank=rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    assert not [w for w in caught if "keys" in str(w.message)]
    expected = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    assert sum(not torch.equal(got[k], base[k]) for k in base) == 14  # 7 modules x 2 layers
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=ATOL, atol=ATOL, msg=name)


def test_bf16_base_is_rounded_once(tmp_path):
    """A bf16 base keeps its dtype; each merged value is PEFT's fp32 merge rounded once to bf16."""
    base_dir = _save_zoo(tmp_path / "base")
    bf16_dir = tmp_path / "base-bf16"
    bf16_dir.mkdir()
    bf16 = {k: v.to(torch.bfloat16) for k, v in load_file(base_dir / "model.safetensors").items()}
    save_file(bf16, bf16_dir / "model.safetensors")
    adapters = [
        _make_adapter(load_module(LayerZoo(), bf16_dir), ZOO_CASES["loha-effective-conv"], tmp_path / "loha"),
        _make_adapter(load_module(LayerZoo(), bf16_dir), ZOO_CASES["lokr-full-w2"], tmp_path / "lokr", seed=2),
    ]
    lorafuse.merge(bf16_dir, adapters, tmp_path / "merged")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    expected = peft_merged_in_turn(load_module(LayerZoo(), bf16_dir), adapters)  # fp32 weights holding the bf16 values
    for name, value in expected.items():
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name], value.to(torch.bfloat16), msg=name)  # bf16's tolerance: 1 rounding


def test_update_for_another_base_is_refused(tmp_path):
    """A LoHa whose factors fit together but not the base tensor (another model's widths) does not fit."""
    from lorafuse.errors import ShapeMismatchError

    base_dir, adapter = _zoo_adapter(tmp_path, LoHaConfig(target_modules=["lin"], r=2))
    gen = torch.Generator().manual_seed(0)
    wider = {f"base_model.model.lin.hada_w{i}_a": torch.randn(40, 2, generator=gen) for i in (1, 2)}
    _edit_adapter(adapter, None, wider)
    with pytest.raises(ShapeMismatchError, match=r"does not fit base tensor 'lin.weight'.*\(40, 24\)"):
        lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")


def test_nan_in_a_factor_is_refused(tmp_path):
    from lorafuse.errors import NonFiniteError

    base_dir, adapter = _zoo_adapter(tmp_path, LoKrConfig(target_modules=["lin"], r=2))
    _edit_adapter(adapter, None, {"base_model.model.lin.lokr_w1": torch.full((6, 4), float("nan"))})
    with pytest.raises(NonFiniteError, match="lokr_w1' holds NaN or Inf"):
        lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")
