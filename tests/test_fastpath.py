"""The one merge pipeline (merger.py): every entry point merges through it with the numpy kernel, without torch.

The CLI and the Python API write bit-identical files and the same provenance (but for timings and paths); merges
that once needed the torch engine (DoRA, embeddings, modules_to_save, patterns) run on the same kernel; the tiny
example and a plain LoRA merge import no torch; what needs torch and lacks it says which extra to install.
(Equality with PEFT: tests/test_merge_parity.py; with a float64 reference: tests/test_engine_stream.py.)
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
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny"
NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` now fails, as where it is not installed


def cli(*args: str) -> int:
    return main(["merge", *map(str, args)])


def provenance(folder: Path) -> dict:
    data = json.loads((folder / "lorafuse_merge.json").read_text())
    return {k: v for k, v in data.items() if k not in ("seconds", "output")}


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "lorafuse_merge.json"}


def run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


@pytest.fixture(scope="module")
def llama_fp16(models_root) -> Path:
    return make_llama(models_root, dtype=torch.float16, name="llama-fp16")


@pytest.mark.parametrize("fixture", ["llama_untied", "llama_bf16", "llama_fp16"])
def test_cli_and_api_write_the_same_bytes_and_provenance(fixture, request, tmp_path):
    base = request.getfixturevalue(fixture)
    first = make_peft_adapter(base, tmp_path / "a1", target_modules=ALL_LINEAR, r=8, use_rslora=True)
    second = make_peft_adapter(base, tmp_path / "a2", target_modules=["q_proj", "down_proj"], seed=2)
    assert cli(base, first, second, "--weight", "0.7", "--weight", "1.5", "--max-shard-size", "40KB", "-o",
               tmp_path / "cli") == 0  # fmt: skip
    lorafuse.merge(base, [first, second], tmp_path / "api", weights=[0.7, 1.5], max_shard_size="40KB")
    assert weight_bytes(tmp_path / "cli") == weight_bytes(tmp_path / "api")
    assert "model.safetensors.index.json" in weight_bytes(tmp_path / "cli")  # several shards
    assert provenance(tmp_path / "cli") == provenance(tmp_path / "api")
    assert provenance(tmp_path / "cli")["engine"] == "numpy"
    expected = peft_merged(base, [first, second], weights=[0.7, 1.5]).state_dict()
    tol = 1e-5 if fixture == "llama_untied" else 2e-2
    for name, tensor in read_tensors(tmp_path / "cli").items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=tol, atol=tol, msg=name)


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
def test_every_adapter_kind_takes_the_same_kernel_from_every_entry_point(llama_untied, tmp_path, kwargs):
    adapter = make_peft_adapter(llama_untied, tmp_path / "a", **kwargs)
    assert cli(llama_untied, adapter, "-o", tmp_path / "cli") == 0
    lorafuse.merge(llama_untied, [adapter], tmp_path / "api")
    assert weight_bytes(tmp_path / "cli") == weight_bytes(tmp_path / "api")
    assert provenance(tmp_path / "cli") == provenance(tmp_path / "api")
    assert provenance(tmp_path / "cli")["engine"] == "numpy"


@pytest.mark.parametrize("case", ["example", "plain-lora", "dora"])
def test_merge_imports_no_torch(case, llama_bf16, tmp_path):
    if case == "example":
        base, adapter = EXAMPLE / "base", EXAMPLE / "adapter"
    else:
        base = llama_bf16
        adapter = make_peft_adapter(base, tmp_path / "a", target_modules=ALL_LINEAR, use_dora=case == "dora")
    script = (
        NO_TORCH + "from lorafuse.cli import main\n"
        f"code = main(['merge', {str(base)!r}, {str(adapter)!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "assert sys.modules['torch'] is None and not [m for m in sys.modules if m.startswith('torch.')]\n"
        "sys.exit(code)\n"
    )
    proc = run_python(script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lorafuse.merge(base, [adapter], tmp_path / "with-torch")
    assert weight_bytes(tmp_path / "out") == weight_bytes(tmp_path / "with-torch")


@pytest.mark.parametrize("what", ["bin-output", "bin-input", "cuda", "pt-output"])
def test_what_needs_torch_says_which_extra_in_one_line(what, tmp_path):
    base, adapter, out = EXAMPLE / "base", EXAMPLE / "adapter", tmp_path / "out"
    if what == "bin-input":  # a pickled base checkpoint
        (tmp_path / "pickled").mkdir()
        torch.save(load_file(base / "model.safetensors"), tmp_path / "pickled" / "pytorch_model.bin")
        (tmp_path / "pickled" / "config.json").write_text((base / "config.json").read_text())
        call = f"main(['merge', {str(tmp_path / 'pickled')!r}, {str(adapter)!r}, '-o', {str(out)!r}])"
    elif what == "pt-output":  # lora-merger's .pt output is a torch.save pickle
        source, lora = base / "model.safetensors", adapter / "adapter_model.safetensors"
        call = f"merger_main(['--source-model', {str(source)!r}, '--lora-model', {str(lora)!r}, '--output', "
        call += f"{str(out)!r}, '--output-format', 'pytorch'])"
    else:
        extra = "'--format', 'bin'" if what == "bin-output" else "'--device', 'cuda'"
        call = f"main(['merge', {str(base)!r}, {str(adapter)!r}, '-o', {str(out)!r}, {extra}])"
    before = sorted(p.name for p in tmp_path.iterdir())
    imports = "from lorafuse.cli import main\nfrom lorafuse.cli.compat import merger_main\n"
    proc = run_python(NO_TORCH + imports + f"sys.exit({call})")
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'lorafuse[torch]'" in lines[0] and "Traceback" not in proc.stderr, lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left


def test_bad_values_are_the_same_errors_and_warnings(llama_untied, tmp_path, capsys):
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
    assert "all zero" in " ".join(json.loads((tmp_path / "zero" / "lorafuse_merge.json").read_text())["warnings"])


def test_overflow_found_during_the_merge_leaves_nothing(llama_fp16, tmp_path, capsys):
    """fp16 overflow shows only in the merged values, after the prefill started writing the output."""
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


def test_interrupted_merge_leaves_nothing(llama_bf16, tmp_path, monkeypatch, capsys):
    from lorafuse.engine import kernel

    adapter = make_peft_adapter(llama_bf16, tmp_path / "a", target_modules=ALL_LINEAR)
    calls: list[str] = []
    original = kernel.RowMerger.merge

    def interrupted(self, out, *args):
        calls.append(out.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-merge (here in a math thread)
        return original(self, out, *args)

    monkeypatch.setattr(kernel.RowMerger, "merge", interrupted)
    assert cli(llama_bf16, adapter, "-o", tmp_path / "out") == 130
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
