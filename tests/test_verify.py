"""``lorafuse verify`` and ``lorafuse merge --verify``: pass on good merges, fail (naming the tensor) on bad ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_llama, make_peft_adapter, peft_merged, read_tensors
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.arrays import BF16, F16, F32
from lorafuse.cli import main
from lorafuse.verify import ulp, verify

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny"
BASE, ADAPTER = EXAMPLE / "base", EXAMPLE / "adapter"
TOUCHED = "model.layers.1.self_attn.o_proj.weight"
UNTOUCHED = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def merged_bf16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "merged"
    lorafuse.merge(BASE, [ADAPTER], out)
    return out


def _copy_with(merged: Path, dest: Path, change) -> Path:
    """A copy of a merged folder whose tensors went through ``change(state)``."""
    shutil.copytree(merged, dest)
    state = load_file(dest / "model.safetensors")
    change(state)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_ulp():
    assert ulp(np.array([1.0]), BF16)[0] == 2.0**-7
    assert ulp(np.array([1.5]), F32)[0] == 2.0**-23
    assert ulp(np.array([-3.0]), F16)[0] == 2.0**-9
    assert ulp(np.array([0.0]), F16)[0] == 2.0**-24


def test_weight_level_needs_no_torch_and_a_bare_verify_warns(merged_bf16):
    """Without torch the weights are still checked in full (also a tampered tensor); the output check is skipped
    with one warning naming the install, and --no-output-check skips it without one."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from lorafuse.cli import main\n"
        f"merged, base, adapter = {str(merged_bf16)!r}, {str(BASE)!r}, {str(ADAPTER)!r}\n"
        "sys.exit(main(['verify', merged, '--base', base, '--adapter', adapter, *sys.argv[1:]]))\n"
    )
    bare = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert "pip install 'lorafuse[torch]' transformers" in bare.stderr and "--no-output-check" in bare.stderr
    assert "outputs      skipped: the output-level check needs torch" in bare.stdout and "PASSED" in bare.stdout
    quiet = subprocess.run([sys.executable, "-c", script, "--no-output-check"], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
    wrong = subprocess.run([sys.executable, "-c", script, "--weight", "0.9"], capture_output=True, text=True)
    assert wrong.returncode == 1 and "14 tensor(s) differ" in wrong.stderr, wrong.stderr[-2000:]


def test_good_merge_passes_weights_and_outputs(merged_bf16, capsys):
    report = verify(merged_bf16, BASE, [ADAPTER])
    assert report.passed, report.failures
    assert report.tensors_checked == 24 and report.tensors_touched == 14
    assert 0 < report.max_ulp <= 0.5  # one correct rounding to bf16
    assert report.output is not None and report.output.ran and report.output.method == "runtime LoRA"
    assert report.output.ok and report.output.max_logit_diff > 0
    assert main(["verify", str(merged_bf16), "--base", str(BASE), "--adapter", str(ADAPTER), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True and data["output"]["top1_agreement"] >= 0.9


def test_tampered_merged_file_fails_naming_tensors(merged_bf16, tmp_path, capsys):
    def tamper(state):
        state[TOUCHED][3, 5] = state[TOUCHED][3, 5] * 1.05  # a few bf16 steps off
        one_bit = state[UNTOUCHED].view(torch.int16)
        one_bit[7] += 1  # the smallest possible change of a tensor no adapter touches

    bad = _copy_with(merged_bf16, tmp_path / "bad", tamper)
    report = verify(bad, BASE, [ADAPTER], outputs=False)
    assert not report.passed
    assert {f.name for f in report.failures} == {TOUCHED, UNTOUCHED}
    assert report.failures[0].name == TOUCHED and report.failures[0].max_ulp > 1
    args = ["verify", str(bad), "--base", str(BASE), "--adapter", str(ADAPTER), "--no-output-check"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert f"FAIL {TOUCHED}" in captured.out and TOUCHED in captured.err and UNTOUCHED in captured.err


def test_missing_and_extra_tensors_fail(merged_bf16, tmp_path):
    def change(state):
        state["extra.weight"] = torch.zeros(2)
        del state["model.norm.weight"]

    bad = _copy_with(merged_bf16, tmp_path / "bad", change)
    report = verify(bad, BASE, [ADAPTER], outputs=False)
    problems = {f.name: f.problem for f in report.failures}
    assert "missing" in problems["model.norm.weight"] and "unexpected" in problems["extra.weight"]


def test_wrong_adapter_weight_fails(merged_bf16, capsys):
    args = ["verify", str(merged_bf16), "--base", str(BASE), "--adapter", str(ADAPTER), "--weight", "0.9"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "14 tensor(s) differ" in captured.err


def test_wrong_base_fails(merged_bf16, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(BASE, other)
    state = load_file(other / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name, tensor in state.items():
        if tensor.dim() == 2:
            state[name] = (torch.randn(tensor.shape, generator=gen) * 0.05).to(tensor.dtype)
    save_file(state, other / "model.safetensors")
    report = verify(merged_bf16, other, [ADAPTER])
    assert not report.passed
    failed = {f.name for f in report.failures}
    assert TOUCHED in failed and "model.embed_tokens.weight" in failed
    assert report.output.ran and not report.output.ok  # the outputs differ as well


def test_outputs_catch_what_weights_cannot(merged_bf16, tmp_path):
    """Same tensors, a different architecture setting: only the output-level check sees it."""
    bad = tmp_path / "bad"
    shutil.copytree(merged_bf16, bad)
    config = json.loads((bad / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (bad / "config.json").write_text(json.dumps(config))
    report = verify(bad, BASE, [ADAPTER])
    assert not report.failures and report.output.ran and not report.output.ok and not report.passed
    assert "outputs differ" in report.failure_message()


def test_dtype_change_several_adapters_and_weights(tmp_path):
    base = make_llama(tmp_path, name="llama", dtype=torch.bfloat16)
    a1 = make_peft_adapter(base, tmp_path / "a1", target_modules=["q_proj", "down_proj"], seed=1)
    a2 = make_peft_adapter(base, tmp_path / "a2", target_modules=["q_proj", "lm_head"], seed=2)
    out = tmp_path / "merged"
    lorafuse.merge(base, [a1, a2], out, weights=[0.7, -0.3], dtype="fp32")
    report = verify(out, base, [a1, a2], weights=[0.7, -0.3])
    assert report.passed, report.failures
    assert report.output.ok and report.output.max_logit_diff < 1e-4 * report.output.max_logit
    swapped = verify(out, base, [a1, a2], weights=[-0.3, 0.7], outputs=False)
    assert not swapped.passed


def test_peft_merge_verifies(tmp_path):
    """A model merged by PEFT itself (fp32) passes: only the fp32 summation order differs."""
    base = make_llama(tmp_path, name="llama")
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "up_proj"])
    out = tmp_path / "peft-merged"
    peft_merged(base, [adapter]).save_pretrained(out)
    assert set(read_tensors(out)) == set(read_tensors(base))
    report = verify(out, base, [adapter], outputs=False)
    assert report.passed, report.failures


def test_merge_verify_flag(tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(BASE), str(ADAPTER), "-o", str(out), "--verify", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensors_touched"] == 14 and data["verify"]["passed"] is True
    assert data["verify"]["output"]["ran"] is True
    assert main(["merge", str(BASE), str(ADAPTER), "-o", str(tmp_path / "m2"), "--verify"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0  # inspect names what a lorafuse merge was made from
    assert f"{BASE} + {ADAPTER} (weight 1.0)" in capsys.readouterr().out


def test_dora_merge_verifies_with_runtime_outputs(tmp_path):
    base = make_llama(tmp_path, name="llama")
    adapter = make_peft_adapter(base, tmp_path / "dora", target_modules=["k_proj", "gate_proj"], use_dora=True)
    out = tmp_path / "merged"
    lorafuse.merge(base, [adapter], out)
    report = verify(out, base, [adapter])
    assert report.passed, report.failures
    assert report.output.method == "runtime LoRA" and report.output.top1_agreement == 1.0


def test_kohya_merge_verifies(tmp_path):
    """A non-PEFT format: names resolved against the base for the recomputation and for runtime LoRA."""
    state = load_file(ADAPTER / "adapter_model.safetensors")
    kohya = {}
    for key, tensor in state.items():
        module, kind = key[len("base_model.model.") :].rsplit(".lora_", 1)
        flat = "lora_te_" + module.replace(".", "_")
        kohya[f"{flat}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{flat}.alpha"] = torch.tensor(16.0)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, path)
    out = tmp_path / "merged"
    lorafuse.merge(BASE, [path], out)
    report = verify(out, BASE, [path], weights=[1.0])
    assert report.passed and report.tensors_touched == 14, report.failures
    assert report.output.ran and report.output.method == "runtime LoRA"
    assert not verify(out, BASE, [path], weights=[0.5], outputs=False).passed


def test_prompts_and_max_ulp_flag(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", "hello", "world", "the", "cat", "sat"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>").save_pretrained(base)
    out = tmp_path / "merged"
    lorafuse.merge(base, [ADAPTER], out)
    report = verify(out, base, [ADAPTER], prompts=["hello world", "the cat sat hello"])
    assert report.passed and report.output.tokens == 6  # padding is not compared
    common = ["verify", str(out), "--base", str(base), "--adapter", str(ADAPTER), "--no-output-check"]
    assert main([*common, "--max-ulp", "0"]) == 1  # a bf16 merge is 0.5 ulp from the exact value
    assert "ulp" in capsys.readouterr().err
    assert main([*common, "--max-ulp", "0.5"]) == 0
