"""Adapters of different PEFT tuner types merged in sequence on the same tensors, one of them DoRA.

PEFT holds several LoRA/DoRA adapters in one model, where DoRA's norm is taken from the weight without the other
LoRA adapters' updates; an adapter of another tuner type can only be merged before the next one is loaded, so the
DoRA after it takes its norm from the weight that adapter left. The oracle is PEFT's sequential merge: each adapter
loaded on the model the previous one was merged into, then ``merge_and_unload()``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import load_model, read_tensors
from peft import PeftConfig, PeftModel, get_peft_model
from tuner_helpers import nudge_trainable, peft_merged_in_turn, tiny_qwen3

import lorafuse
from lorafuse.cli import main
from lorafuse.edits import BiasDelta, DoraDelta, FullDiff, LoraDelta, Replace, RowReplace
from lorafuse.engine.kernel import unedited_points

os.environ.setdefault("OMP_NUM_THREADS", "1")
TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 2e-5
DORA = ("LORA", dict(target_modules=TARGETS, r=4, lora_alpha=8, use_dora=True))
LORA = ("LORA", dict(target_modules=TARGETS, r=4, lora_alpha=8))
OTHERS = {
    "ia3": ("IA3", dict(target_modules=TARGETS, feedforward_modules=["down_proj"])),
    "oft": ("OFT", dict(target_modules=TARGETS, oft_block_size=8, r=0)),
    "loha": ("LOHA", dict(target_modules=TARGETS, r=4, alpha=8)),
}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "qwen3")


def _adapter(base: Path, case: tuple[str, dict], out: Path, seed: int) -> Path:
    """A PEFT adapter of ``case`` (peft_type, config) with every trained tensor moved off PEFT's initial values."""
    peft_type, kwargs = case
    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), PeftConfig.from_peft_type(peft_type=peft_type, **kwargs))
    nudge_trainable(model, 0.3, seed)
    # no saved copy of a targeted embedding: lorafuse puts one first, before the other adapters' edits
    model.save_pretrained(out, save_embedding_layers=False)
    return out


def _assert_matches(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = read_tensors(out)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=ATOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("other", sorted(OTHERS))
@pytest.mark.parametrize("dora_last", [True, False], ids=["then-dora", "dora-first"])
def test_another_tuner_and_dora_match_peft_s_sequential_merge(other, dora_last, qwen3, tmp_path):
    first = _adapter(qwen3, OTHERS[other], tmp_path / other, seed=1)
    dora = _adapter(qwen3, DORA, tmp_path / "dora", seed=2)
    adapters = [first, dora] if dora_last else [dora, first]
    out = tmp_path / "merged"
    assert main(["merge", str(qwen3), *map(str, adapters), "-o", str(out), "--dtype", "float32"]) == 0
    expected = peft_merged_in_turn(load_model(qwen3), adapters)
    _assert_matches(out, expected)
    if dora_last:  # the test can fail: with DoRA's norm of the unedited base (one run of edits) it does
        import lorafuse.engine.kernel as kernel

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernel, "joins_lora_group", lambda edit: True)
            lorafuse.merge(qwen3, adapters, tmp_path / "one-run", dtype="fp32")
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.allclose(read_tensors(tmp_path / "one-run")[key], expected[key], atol=1e-3)


def test_lora_then_another_tuner_then_dora(qwen3, tmp_path):
    """LoRA, IA3, DoRA: DoRA's norm is of the weight after IA3 (which scaled the LoRA-merged weight)."""
    adapters = [
        _adapter(qwen3, LORA, tmp_path / "lora", seed=3),
        _adapter(qwen3, OTHERS["ia3"], tmp_path / "ia3", seed=4),
        _adapter(qwen3, DORA, tmp_path / "dora", seed=5),
    ]
    out = tmp_path / "merged"
    lorafuse.merge(qwen3, adapters, out, dtype="fp32")
    _assert_matches(out, peft_merged_in_turn(load_model(qwen3), adapters))


def test_merge_verify_passes_on_a_sequence(qwen3, tmp_path, capsys):
    """The weight and output levels of verify agree with the merge of IA3 then DoRA (and LoRA then IA3)."""
    adapters = [
        _adapter(qwen3, LORA, tmp_path / "lora", seed=6),
        _adapter(qwen3, OTHERS["ia3"], tmp_path / "ia3", seed=7),
        _adapter(qwen3, DORA, tmp_path / "dora", seed=8),
    ]
    out = tmp_path / "merged"
    assert main(["merge", str(qwen3), *map(str, adapters), "-o", str(out), "--dtype", "float32", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "outputs" in text and "skipped" not in text


def test_runs_start_after_each_edit_outside_a_lora_group():
    """Where the kernels copy the tensor for DoRA: at the start, and after an edit that is not a LoRA adapter's."""
    lora = LoraDelta(None, None, 1.0)  # type: ignore[arg-type]  # the refs are never read here
    dora = DoraDelta(None, None, 1.0)  # type: ignore[arg-type]
    other = RowReplace(None, (0,))  # type: ignore[arg-type]
    replace = Replace(None)  # type: ignore[arg-type]
    bias = BiasDelta(None, 1.0)  # type: ignore[arg-type]
    diff = FullDiff(None)  # type: ignore[arg-type]  # a full-rank LoRA (kohya .diff): one of the group
    assert unedited_points([lora, dora]) == {0: True}
    assert unedited_points([dora, lora]) == {0: False}
    assert unedited_points([diff, dora]) == {0: True}
    assert unedited_points([other, dora]) == {0: False, 1: False}
    assert unedited_points([lora, other, lora, bias, dora]) == {0: False, 2: True}
    assert unedited_points([lora, replace, dora]) == {0: False, 2: False}
    assert unedited_points([replace, lora, dora], first=1) == {1: True}


def test_runtime_lora_then_ia3_is_peft_s_sequential_model_and_comes_off(qwen3, tmp_path):
    """The runtime folds the earlier LoRA into the copy IA3 scales (IA3 scales the LoRA-merged weight, as PEFT's
    sequential merge does), and removing either adapter gives the model with the other one alone."""
    from lorafuse.runtime import apply_adapter, remove_adapter

    lora = _adapter(qwen3, LORA, tmp_path / "lora", seed=9)
    ia3 = _adapter(qwen3, OTHERS["ia3"], tmp_path / "ia3", seed=10)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    def peft_model(adapters, merged_first=()):
        model = load_model(qwen3)
        for path in merged_first:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        return PeftModel.from_pretrained(model, adapters[0]).eval() if adapters else model

    model = load_model(qwen3)
    base = logits(model)
    first = apply_adapter(model, lora)
    second = apply_adapter(model, ia3)
    expected = logits(peft_model([ia3], merged_first=[lora]))
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, logits(peft_model([lora], merged_first=[ia3])), atol=1e-3)  # order matters
    remove_adapter(model, second)
    torch.testing.assert_close(logits(model), logits(peft_model([lora])), rtol=1e-5, atol=1e-5)
    apply_adapter(model, ia3, name="again")
    remove_adapter(model, first)
    torch.testing.assert_close(logits(model), logits(peft_model([ia3])), rtol=1e-5, atol=1e-5)
    remove_adapter(model)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def test_torch_kernel_takes_dora_s_norm_where_the_numpy_kernel_does(qwen3, tmp_path):
    """The CUDA kernel's torch path (run here on the CPU) copies the tensor for DoRA at the same places."""
    import json

    import numpy as np

    from lorafuse.engine.cuda import CudaMerger
    from lorafuse.engine.kernel import RowMerger, tensor_array
    from lorafuse.formats import read_adapter
    from lorafuse.io.checkpoint import Checkpoint
    from lorafuse.plan import build_plan

    folders = [
        _adapter(qwen3, LORA, tmp_path / "lora", seed=11),
        _adapter(qwen3, OTHERS["oft"], tmp_path / "oft", seed=12),
        _adapter(qwen3, DORA, tmp_path / "dora", seed=13),
    ]
    base = Checkpoint(sorted(qwen3.glob("*.safetensors")))
    plan = build_plan(
        base, [read_adapter(f) for f in folders], base_config=json.loads((qwen3 / "config.json").read_text())
    )
    touched = plan.touched
    assert len(touched) == 3 and all(len(out.edits) == 3 for out in touched)
    for out in touched:
        on_numpy = tensor_array(out, RowMerger(plan).merge)
        assert np.allclose(on_numpy, tensor_array(out, CudaMerger(plan, "cpu").merge), atol=1e-6, rtol=0), out.name
    expected = peft_merged_in_turn(load_model(qwen3), folders)
    for out in touched:
        torch.testing.assert_close(torch.from_numpy(tensor_array(out, RowMerger(plan).merge)), expected[out.name])


def test_trained_token_rows_then_a_dora_embedding(qwen3, tmp_path):
    """DoRA on an embedding (its norm along columns: the whole tensor) after trainable tokens replaced some rows."""
    tokens = ("TRAINABLE_TOKENS", dict(target_modules=["embed_tokens"], token_indices=[1, 5, 9]))
    dora = ("LORA", dict(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8, use_dora=True))
    adapters = [_adapter(qwen3, tokens, tmp_path / "tokens", seed=14), _adapter(qwen3, dora, tmp_path / "dora", 15)]
    out = tmp_path / "merged"
    lorafuse.merge(qwen3, adapters, out, dtype="fp32")
    expected = peft_merged_in_turn(load_model(qwen3), adapters)
    _assert_matches(out, expected)
    key = "model.embed_tokens.weight"
    assert not torch.allclose(expected[key], read_tensors(qwen3)[key], atol=1e-3)
