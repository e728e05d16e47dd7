"""``lora-extractor`` / ``lora-merger`` with the original scripts' own example invocations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafuse.cli.compat import extractor_main, merger_main

DIM = 1024  # 1024 x 1024 >= --min-params (1,000,000): factorised; everything else is a full difference
Q = "blocks.0.self_attn.q"


def _randn(*shape: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A Wan-like base in two shards (no index) and a tuned copy: a planted rank-8 change of the big weight and
    changed bias, modulation and norm; the returned dict is the tuned model in fp32."""
    root = tmp_path_factory.mktemp("seed")
    base = {
        f"{Q}.weight": _randn(DIM, DIM, seed=0),
        f"{Q}.bias": _randn(DIM, seed=1),
        "blocks.0.modulation": _randn(1, 6, 64, seed=2),
        "blocks.0.norm.weight": 1 + _randn(DIM, seed=3),
        "head.head.weight": _randn(16, DIM, seed=4),  # unchanged
    }
    tuned = {k: v.clone() for k, v in base.items()}
    tuned[f"{Q}.weight"] += _randn(DIM, 8, seed=5, scale=0.05) @ _randn(8, DIM, seed=6, scale=0.05)
    tuned[f"{Q}.bias"] += _randn(DIM, seed=7)
    tuned["blocks.0.modulation"] += _randn(1, 6, 64, seed=8)
    tuned["blocks.0.norm.weight"] += _randn(DIM, seed=9)
    for name, tensors in (("base", base), ("tuned", tuned)):
        folder = root / name
        folder.mkdir()
        keys = list(tensors)
        save_file({k: tensors[k] for k in keys[:2]}, folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
        save_file({k: tensors[k] for k in keys[2:]}, folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    return root / "base", root / "tuned", tuned


def _merged(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def test_basic_extract_then_merge(models, tmp_path, capsys):
    base, tuned, want = models
    out = tmp_path / "extracted" / "lora"  # the suffix is appended, the folder created
    assert (
        extractor_main(
            ["--source-model", str(base), "--target-model", str(tuned), "--output", str(out), "--rank", "32"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for line in ("Processed weights: 4", "Direct diff: 3", "LoRA decomposition: 1", "Similar weights: 1"):
        assert line in printed
    lora = load_file(tmp_path / "extracted" / "lora.safetensors")
    assert sorted(lora) == sorted(
        [
            f"diffusion_model.{Q}.lora_down.weight",
            f"diffusion_model.{Q}.lora_up.weight",
            f"diffusion_model.{Q}.diff_b",
            "diffusion_model.blocks.0.diff_m",
            "diffusion_model.blocks.0.norm.diff",
        ]
    )
    assert all(t.dtype == torch.bfloat16 for t in lora.values())
    assert lora[f"diffusion_model.{Q}.lora_up.weight"].shape == (DIM, 32)

    merged_path = tmp_path / "merged" / "model.safetensors"
    assert merger_main(
        ["--source-model", str(base), "--lora-model", str(tmp_path / "extracted" / "lora.safetensors"),
         "--output", str(merged_path), "--alpha", "1.0"]
    ) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "LoRA merged: 1" in printed and "Diff merged: 3" in printed
    merged = _merged(merged_path)
    assert merged.keys() == want.keys() and all(t.dtype == torch.bfloat16 for t in merged.values())
    for name, value in want.items():
        torch.testing.assert_close(merged[name].float(), value, rtol=2e-2, atol=2e-3, msg=name)


def test_high_rank_fp16(models, tmp_path):
    base, tuned, _ = models
    out = tmp_path / "high_rank_lora.safetensors"
    assert extractor_main(
        ["--source-model", str(base), "--target-model", str(tuned), "--output", str(out), "--rank", "64",
         "--output-dtype", "fp16"]
    ) == 0  # fmt: skip
    lora = load_file(out)
    assert lora[f"diffusion_model.{Q}.lora_down.weight"].shape == (64, DIM)
    assert all(t.dtype == torch.float16 for t in lora.values())


def test_diff_only_fp32_round_trip_is_exact_and_alpha_scales(models, tmp_path):
    base, tuned, want = models
    out = tmp_path / "weight_diff.safetensors"
    assert extractor_main(
        ["--source-model", str(base), "--target-model", str(tuned), "--output", str(out), "--diff-only",
         "--output-dtype", "fp32"]
    ) == 0  # fmt: skip
    assert f"diffusion_model.{Q}.diff" in load_file(out)
    merged_path = tmp_path / "merged_model.safetensors"
    args = ["--source-model", str(base), "--lora-model", str(out), "--output", str(merged_path)]
    assert merger_main(args + ["--output-dtype", "fp32"]) == 0
    merged = _merged(merged_path)
    for name, value in want.items():
        assert torch.equal(merged[name], value), name
    # Partial strength: base + 0.7 * diff (an existing output file is replaced, as the original script did).
    assert merger_main(args + ["--alpha", "0.7", "--output-dtype", "fp32"]) == 0
    merged = _merged(merged_path)
    base_q = load_file(next(base.glob("*00001*")))[f"{Q}.weight"]
    torch.testing.assert_close(merged[f"{Q}.weight"], base_q + 0.7 * (want[f"{Q}.weight"] - base_q))


def test_pytorch_source_and_outputs(models, tmp_path):
    base, tuned, want = models
    state = {}
    for path in sorted(base.glob("*.safetensors")):
        state.update(load_file(path))
    torch.save({"state_dict": state}, tmp_path / "model.pt")  # nested, as the original scripts accepted
    shutil.copytree(tuned, tmp_path / "tuned")
    lora = tmp_path / "lora"
    assert extractor_main(
        ["--source-model", str(tmp_path / "model.pt"), "--source-type", "pytorch", "--target-model",
         str(tmp_path / "tuned"), "--output", str(lora), "--output-format", "pytorch", "--output-dtype", "fp32"]
    ) == 0  # fmt: skip
    assert (tmp_path / "lora.pt").is_file()
    # The documented multi-format invocation, then a pytorch output.
    merged = tmp_path / "merged_model.safetensors"
    assert merger_main(
        ["--source-model", str(tmp_path / "model.pt"), "--source-type", "pytorch", "--lora-model",
         str(tmp_path / "lora.pt"), "--lora-type", "pytorch", "--output", str(merged), "--output-format",
         "safetensors", "--alpha", "1.0", "--output-dtype", "fp32"]
    ) == 0  # fmt: skip
    for name, value in want.items():
        torch.testing.assert_close(load_file(merged)[name], value, rtol=0, atol=1e-5, msg=name)
    assert merger_main(
        ["--source-model", str(base), "--lora-model", str(tmp_path / "lora.pt"), "--lora-type", "pytorch",
         "--output", str(tmp_path / "m"), "--output-format", "pytorch", "--output-dtype", "fp32"]
    ) == 0  # fmt: skip
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.testing.assert_close(loaded[f"{Q}.weight"], want[f"{Q}.weight"], rtol=0, atol=1e-5)
    # A type that does not match the file is an error, not a guess.
    assert merger_main(["--source-model", str(tmp_path / "model.pt"), "--lora-model", str(tmp_path / "lora.pt"),
                        "--lora-type", "pytorch", "--output", str(tmp_path / "x")]) == 1  # fmt: skip


def test_unknown_keys_error_unless_allowed_and_shape_mismatch_reported(models, tmp_path, capsys):
    base, _, _ = models
    lora = {
        "diffusion_model.blocks.0.norm.diff": torch.ones(DIM),
        "diffusion_model.blocks.9.nothing.diff": torch.ones(3),
        "diffusion_model.head.head.diff": torch.ones(3, 3),  # wrong shape
    }
    save_file(lora, tmp_path / "lora.safetensors")
    args = ["--source-model", str(base), "--lora-model", str(tmp_path / "lora.safetensors"), "--output"]
    assert merger_main(args + [str(tmp_path / "a.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "blocks.9.nothing.diff" in err and "--allow-unmatched" in err
    assert not (tmp_path / "a.safetensors").exists()
    assert merger_main(args + [str(tmp_path / "b.safetensors"), "--allow-unmatched", "--output-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "Skipped source weights (shape mismatch): 1" in out and "head.head.weight" in out
    assert "Skipped LoRA weights (no source tensor): 1" in out
    merged = load_file(tmp_path / "b.safetensors")
    base_norm = load_file(next(base.glob("*00002*")))["blocks.0.norm.weight"]
    torch.testing.assert_close(merged["blocks.0.norm.weight"], base_norm + 1)


def test_console_scripts_are_installed(models, tmp_path):
    base, tuned, _ = models
    run = subprocess.run(
        ["lora-extractor", "--source-model", str(base), "--target-model", str(tuned), "--output",
         str(tmp_path / "l"), "--diff-only"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Direct diff: 4" in run.stdout and (tmp_path / "l.safetensors").is_file()


def test_extractor_runs_without_torch(models, tmp_path):
    """torch is an extra: lora-extractor (a safetensors output) runs where it is missing."""
    base, tuned, _ = models
    out = tmp_path / "lora"
    script = (
        "import sys; sys.modules['torch'] = None\n"  # import torch now fails
        "from lorafuse.cli.compat import extractor_main\n"
        f"sys.exit(extractor_main(['--source-model', {str(base)!r}, '--target-model', {str(tuned)!r}, "
        f"'--output', {str(out)!r}, '--rank', '8']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA decomposition: 1" in proc.stdout
    lora = load_file(tmp_path / "lora.safetensors")
    assert lora[f"diffusion_model.{Q}.lora_up.weight"].shape == (DIM, 8)


def test_merger_runs_without_torch_and_writes_what_it_writes_with_it(models, tmp_path):
    """torch is an extra: lora-merger (a safetensors output) merges through the numpy kernel where it is missing."""
    base, tuned, _ = models
    lora = tmp_path / "lora.safetensors"
    assert extractor_main(["--source-model", str(base), "--target-model", str(tuned), "--output", str(lora)]) == 0
    args = ["--source-model", str(base), "--lora-model", str(lora), "--alpha", "0.8", "--output"]
    script = (
        "import sys; sys.modules['torch'] = None\n"  # import torch now fails
        "from lorafuse.cli.compat import merger_main\n"
        f"sys.exit(merger_main({args + [str(tmp_path / 'no-torch.safetensors')]!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert merger_main(args + [str(tmp_path / "torch.safetensors")]) == 0
    assert (tmp_path / "no-torch.safetensors").read_bytes() == (tmp_path / "torch.safetensors").read_bytes()
