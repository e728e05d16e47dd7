"""The CLI's torch-free fast path (fastpath.py): plain PEFT LoRA merged with numpy, equal to the torch engine.

Equal means: the same files, the same provenance (but for its engine and timing), and every tensor within one
rounding step of the output dtype (the fp32 sums may associate differently); anything else falls back to the torch
engine, which then reports what it always reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_llama, make_peft_adapter, peft_merged, read_tensors
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cli(*args: str) -> int:
    return main(["merge", *map(str, args)])


def provenance(folder: Path) -> dict:
    data = json.loads((folder / "lorafuse_merge.json").read_text())
    return {k: v for k, v in data.items() if k not in ("seconds", "output", "engine")}


def assert_within_one_rounding(fast: Path, torch_out: Path) -> None:
    ours, theirs = read_tensors(fast), read_tensors(torch_out)
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        else:  # neighbouring values of a 16-bit float: their bit patterns differ by at most 1
            steps = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
            assert steps.max().item() <= 1, name
            # Only near-ties round apart (truncating instead of rounding to nearest would move about half).
            assert steps.float().mean().item() < 0.01, name


@pytest.fixture(scope="module")
def llama_fp16(models_root) -> Path:
    return make_llama(models_root, dtype=torch.float16, name="llama-fp16")


@pytest.mark.parametrize("fixture", ["llama_untied", "llama_bf16", "llama_fp16"])
def test_fast_path_equals_the_torch_engine(fixture, request, tmp_path, monkeypatch):
    base = request.getfixturevalue(fixture)
    first = make_peft_adapter(base, tmp_path / "a1", target_modules=ALL_LINEAR, r=8, use_rslora=True)
    second = make_peft_adapter(base, tmp_path / "a2", target_modules=["q_proj", "down_proj"], seed=2)
    args = [base, first, second, "--weight", "0.7", "--weight", "1.5", "--max-shard-size", "40KB"]
    assert cli(*args, "-o", tmp_path / "fast") == 0
    monkeypatch.setenv("LORAFUSE_FASTPATH", "0")
    assert cli(*args, "-o", tmp_path / "torch") == 0
    assert json.loads((tmp_path / "fast" / "lorafuse_merge.json").read_text())["engine"] == "numpy"
    assert json.loads((tmp_path / "torch" / "lorafuse_merge.json").read_text())["engine"] == "torch"
    assert provenance(tmp_path / "fast") == provenance(tmp_path / "torch")
    names = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert "model.safetensors.index.json" in names  # several shards, as the torch engine cut them
    index = json.loads((tmp_path / "fast" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "torch" / "model.safetensors.index.json").read_text())
    assert_within_one_rounding(tmp_path / "fast", tmp_path / "torch")
    # And against the oracle itself.
    expected = peft_merged(base, [first, second], weights=[0.7, 1.5]).state_dict()
    merged = read_tensors(tmp_path / "fast")
    tol = 1e-5 if fixture == "llama_untied" else 2e-2
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=tol, atol=tol, msg=name)


def test_fast_path_does_not_import_torch(llama_bf16, tmp_path):
    adapter = make_peft_adapter(llama_bf16, tmp_path / "a", target_modules=ALL_LINEAR)
    script = (
        "import sys\n"
        "from lorafuse.cli import main\n"
        f"code = main(['merge', {str(llama_bf16)!r}, {str(adapter)!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "lorafuse_merge.json").read_text())["engine"] == "numpy"


def _engine(folder: Path) -> str:
    return json.loads((folder / "lorafuse_merge.json").read_text())["engine"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=["q_proj"], use_dora=True),
        dict(target_modules=["q_proj", "embed_tokens"]),
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        dict(target_modules=["q_proj"], alpha_pattern={"q_proj": 3}),
    ],
    ids=["dora", "embedding", "modules_to_save", "alpha_pattern"],
)
def test_what_the_fast_path_does_not_cover_goes_to_the_torch_engine(llama_untied, tmp_path, kwargs):
    adapter = make_peft_adapter(llama_untied, tmp_path / "a", **kwargs)
    assert cli(llama_untied, adapter, "-o", tmp_path / "out") == 0
    assert _engine(tmp_path / "out") == "torch"
    lorafuse.merge(llama_untied, [adapter], tmp_path / "api")
    assert read_tensors(tmp_path / "out").keys() == read_tensors(tmp_path / "api").keys()


def test_bad_values_fall_back_and_get_the_torch_engine_s_errors_and_warnings(llama_untied, tmp_path, capsys):
    adapter = make_peft_adapter(llama_untied, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    assert cli(llama_untied, adapter, "-o", tmp_path / "nan") == 1
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "nan").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    zero = make_peft_adapter(
        llama_untied, tmp_path / "z", target_modules=["q_proj"], randomize=False, init_lora_weights=True
    )
    assert cli(llama_untied, zero, "-o", tmp_path / "zero") == 0
    assert _engine(tmp_path / "zero") == "torch"
    assert "all zero" in " ".join(json.loads((tmp_path / "zero" / "lorafuse_merge.json").read_text())["warnings"])


def test_overflow_found_during_the_fast_merge_falls_back_cleanly(llama_fp16, tmp_path, capsys):
    """fp16 overflow shows only in the merged values: the fast path stops and the torch engine reports it."""
    adapter = make_peft_adapter(llama_fp16, tmp_path / "a", target_modules=["down_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key in tensors:
        if "layers.1.mlp.down_proj.lora_B" in key:
            tensors[key] = tensors[key] * 1e6
    save_file(tensors, weights)
    assert cli(llama_fp16, adapter, "-o", tmp_path / "out") == 1
    assert "float16 range" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing half-written left behind


def test_interrupted_fast_merge_leaves_nothing(llama_bf16, tmp_path, monkeypatch, capsys):
    import lorafuse.fastpath as fastpath

    adapter = make_peft_adapter(llama_bf16, tmp_path / "a", target_modules=ALL_LINEAR)
    calls: list[str] = []
    original = fastpath._merge_one

    def interrupted(target, *args):
        calls.append(target.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-merge
        return original(target, *args)

    monkeypatch.setattr(fastpath, "_merge_one", interrupted)
    assert cli(llama_bf16, adapter, "-o", tmp_path / "out") == 130
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
