"""inspect, verify / merge --verify and combine on a real PEFT-saved adapter of every tuner type lorafuse merges.

Each adapter is made by PEFT (``get_peft_model`` + ``save_pretrained``) on a tiny Qwen3 built from a transformers
config, with every trained tensor moved off PEFT's initial values; PEFT's ``merge_and_unload()`` is the oracle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_model, read_tensors
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tuner_helpers import nudge_trainable, tiny_qwen3

import lorafuse.verify_outputs
from lorafuse.cli import main
from lorafuse.tuners import tuner_of

os.environ.setdefault("OMP_NUM_THREADS", "1")
Q = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
# case -> (peft_type, config kwargs): every native tuner type, and three merged through PEFT's layers
CASES = {
    "lora": ("LORA", dict(target_modules=Q, r=4, lora_alpha=8)),
    "dora": ("LORA", dict(target_modules=Q, r=4, lora_alpha=8, use_dora=True)),
    "loha": ("LOHA", dict(target_modules=Q, r=4, alpha=8)),
    "lokr": ("LOKR", dict(target_modules=Q, r=2, alpha=4, decompose_both=True)),
    "ia3": ("IA3", dict(target_modules=Q, feedforward_modules=["down_proj"])),
    "adalora": ("ADALORA", dict(target_modules=Q, init_r=3, lora_alpha=5, total_step=5)),
    "vera": ("VERA", dict(target_modules=Q, r=4)),
    "pvera": ("PVERA", dict(target_modules=Q, r=4)),
    "oft": ("OFT", dict(target_modules=Q, oft_block_size=8, r=0)),
    "boft": ("BOFT", dict(target_modules=Q, boft_block_size=8)),
    "hra": ("HRA", dict(target_modules=Q, r=4)),
    "miss": ("MISS", dict(target_modules=Q, r=8, mini_r=8)),
    "fourierft": ("FOURIERFT", dict(target_modules=Q, n_frequency=40)),
    "shira": ("SHIRA", dict(target_modules=Q, r=2)),
    "ln_tuning": ("LN_TUNING", dict(target_modules=["input_layernorm", "norm"])),
    "trainable_tokens": ("TRAINABLE_TOKENS", dict(target_modules=["embed_tokens"], token_indices=[0, 5, 7])),
    "beft": ("BEFT", dict(target_modules=["q_proj", "v_proj"])),
    "road": ("ROAD", dict(target_modules=Q, group_size=8)),
    "c3a": ("C3A", dict(target_modules=["q_proj", "o_proj"], block_size=16)),
    "vblora": ("VBLORA", dict(target_modules=Q, num_vectors=16, vector_length=8, r=4)),
}
NON_LORA = sorted(c for c, (t, _) in CASES.items() if t != "LORA")
LORA_KINDS = ("lora", "dora")


def test_every_native_tuner_is_covered():
    """A native tuner registered later must be added here: inspect, verify and combine are checked per type."""
    from lorafuse.tuners import registered_tuners

    native = {t.peft_type for t in registered_tuners() if t.how == "native"}
    assert native <= {t for t, _ in CASES.values()}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "qwen3", attention_bias=True)


@pytest.fixture(scope="module")
def adapters(qwen3, tmp_path_factory):
    """case -> (adapter folder, PEFT's merged state dict), made on first use."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(case: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if case not in made:
            peft_type, kwargs = CASES[case]
            torch.manual_seed(0)
            model = get_peft_model(load_model(qwen3), PeftConfig.from_peft_type(peft_type=peft_type, **kwargs))
            nudge_trainable(model, 0.2, seed=1)
            model.save_pretrained(root / case)
            merged = PeftModel.from_pretrained(load_model(qwen3), root / case).merge_and_unload()
            made[case] = (root / case, {k: v.detach().clone() for k, v in merged.state_dict().items()})
        return made[case]

    return get


def _changed(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, value in base.items() if not torch.equal(value, merged[name])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_names_the_tuner_and_every_module(case, qwen3, adapters, capsys):
    peft_type = CASES[case][0]
    adapter, expected = adapters(case)
    base = read_tensors(qwen3)
    changed = _changed(base, expected)
    assert changed, "the adapter changes nothing: the test proves nothing"

    assert main(["inspect", str(adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tuner"] == peft_type
    rows = report["modules"]
    targets = {row["target"] for row in rows}
    assert changed <= targets  # every module PEFT's merge changes is shown
    assert {row["target"] for row in rows if not row["optional"]} <= set(base)  # IA3: a bias where one is
    for row in rows:
        assert row["kind"] and not row["zero_effect"]
        if row["norm"] is not None and row["kind"] != "dora":  # DoRA's is the update before its magnitudes
            change = float(torch.linalg.vector_norm((expected[row["target"]] - base[row["target"]]).double()))
            assert row["norm"] == pytest.approx(change, rel=1e-4), row["target"]
    lora = peft_type == "LORA"
    assert (report["alphas"] is not None) == lora and (report["use_dora"] is not None) == lora

    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert f"tuner        {peft_type}" in text
    assert all(target in text for target in targets)
    assert (("\nalpha " in text) and ("\nrslora/dora " in text)) == lora
    assert ("\nsizes " in text) != lora
    if any(row["norm"] is None for row in rows):
        assert "depends on the base" in text


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_verify_and_verify_pass_on_a_correct_merge(case, qwen3, adapters, tmp_path, capsys):
    """merge --verify and verify pass, and the merge is PEFT's; a non-LoRA tuner's output level runs through PEFT
    (an independent forward: the runtime would apply the merge's own edit math)."""
    adapter, expected = adapters(case)
    out = tmp_path / "merged"
    assert main(["merge", str(qwen3), str(adapter), "-o", str(out), "--dtype", "float32", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text
    assert ("outputs      runtime LoRA" if case in LORA_KINDS else "outputs      PEFT:") in text
    merged = read_tensors(out)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=2e-5, atol=2e-5, msg=name)
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["output"]["ran"] and report["output"]["ok"]


@pytest.mark.parametrize("case", [c for c in NON_LORA if tuner_of(CASES[c][0]).how == "native"])
def test_runtime_applies_every_native_type_without_peft(case, qwen3, adapters, tmp_path, monkeypatch, capsys):
    """Without peft the output level applies the adapter with lorafuse.runtime, and says it is the merge's math."""
    adapter, _ = adapters(case)
    out = tmp_path / "merged"
    assert main(["merge", str(qwen3), str(adapter), "-o", str(out), "--dtype", "float32"]) == 0
    no_peft = SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: None))
    monkeypatch.setattr(lorafuse.verify_outputs, "importlib", no_peft)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and f"{CASES[case][0]} by the merge's own math" in text


@pytest.mark.parametrize("case", ["ia3", "oft", "road"])
def test_verify_fails_on_a_wrong_merge(case, qwen3, adapters, tmp_path, capsys):
    """The checks can fail: a merged weight off by 2% fails the weight level, and the output level (PEFT's
    forward) even when the weight level is told to allow it."""
    adapter, _ = adapters(case)
    out = tmp_path / "merged"
    assert main(["merge", str(qwen3), str(adapter), "-o", str(out), "--dtype", "float32"]) == 0
    path = out / "model.safetensors"
    tensors = read_tensors(out)
    tensors["model.layers.0.self_attn.q_proj.weight"] *= 1.02
    save_file(tensors, path, metadata={"format": "pt"})
    assert main(["verify", str(out), "--no-output-check"]) == 1
    assert main(["verify", str(out), "--max-ulp", "1e12"]) == 1
    assert "outputs differ" in capsys.readouterr().err


@pytest.mark.parametrize("case", NON_LORA)
def test_combine_refuses_each_non_lora_tuner_by_name(case, adapters, tmp_path, capsys):
    adapter, _ = adapters(case)
    lora, _ = adapters("lora")
    peft_type = CASES[case][0]
    for inputs in ([adapter], [lora, adapter]):
        assert main(["combine", *map(str, inputs), "-o", str(tmp_path / "combined")]) == 1
        err = capsys.readouterr().err
        assert f"a PEFT {peft_type} adapter" in err and "merge" in err and "Traceback" not in err
        assert not (tmp_path / "combined").exists()
    assert tuner_of(peft_type) is not None


def test_a_weighted_non_lora_adapter_is_checked_by_the_runtime_and_says_so(qwen3, adapters, tmp_path, capsys):
    """PEFT has no strength for an IA3 adapter: the output level runs the runtime and names what it checks."""
    adapter, _ = adapters("ia3")
    out = tmp_path / "merged"
    args = ["merge", str(qwen3), str(adapter), "-o", str(out), "--dtype", "float32", "--weight", "0.5", "--verify"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "runtime (IA3 by the merge's own math, not an independent check)" in text
