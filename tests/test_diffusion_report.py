"""`lorafuse merge` prints, per adapter of a diffusion model, how many LoRA modules of each part merged and which
part was skipped (the text output and --dry-run), with the counts of the LoRA file itself."""

from __future__ import annotations

import pytest
from test_diffusion_parts import _modules, sd  # noqa: F401

from lorafuse.cli import main
from lorafuse.cli.merge import part_lines


@pytest.mark.parametrize("dry_run", [False, True])
def test_merge_prints_each_parts_merged_and_skipped_modules(sd, tmp_path, capsys, dry_run):  # noqa: F811
    out = tmp_path / "out"
    argv = ["merge", str(sd["unet"]), str(sd["kohya"]), "-o", str(out), "--allow-unmatched", "--quiet"]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 0
    printed = capsys.readouterr().out
    unet, te = _modules(sd["kohya"], "lora_unet_"), _modules(sd["kohya"], "lora_te_")
    assert unet > 0 and te > 0
    want = f"  {sd['kohya']}: UNet/transformer {unet} merged; text encoder 1 skipped ({te} modules, not in the base)"
    assert want in printed.splitlines()
    assert out.exists() != dry_run


def test_a_part_with_merged_and_skipped_modules_says_both():
    """A part that merged some modules and skipped others (no base tensor for them) says both."""
    lines = part_lines(
        [
            {"path": "a.safetensors", "parts": {"UNet/transformer": {"merged": 3, "skipped": 1}}},
            {"path": "b.safetensors"},  # not a diffusion LoRA: no parts, no line
        ]
    )
    assert lines == ["  a.safetensors: UNet/transformer 3 merged, 1 skipped (no tensor in the base)"]
