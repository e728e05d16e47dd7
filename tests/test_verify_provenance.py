"""``lorafuse verify MERGED`` with no adapter: the base, adapters (in order) and weights come from
MERGED/lorafuse_merge.json, the output says so, and inputs that are gone or changed are refused with the fix.

The verdict itself is still the recomputation's: a merged tensor changed after the merge fails.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import make_peft_adapter
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.verify import verify


@pytest.fixture(scope="module")
def merge(llama_untied, tmp_path_factory):
    """(root, merged folder): two adapters merged with weights 0.5 and 2, by relative paths from ``root``."""
    root = tmp_path_factory.mktemp("provenance")
    shutil.copytree(llama_untied, root / "base")
    for name, seed in (("a", 1), ("b", 2)):
        make_peft_adapter(llama_untied, root / name, seed=seed, target_modules=["q_proj", "v_proj", "gate_proj"])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        lorafuse.merge("base", ["a", "b"], "merged", weights=[0.5, 2.0])
    finally:
        os.chdir(cwd)
    return root, root / "merged"


def test_verify_reads_base_adapters_and_weights_from_the_record(merge, capsys):
    root, merged = merge
    assert main(["verify", str(merged), "--no-output-check"]) == 0  # from another folder than the merge's
    out = capsys.readouterr().out
    assert f"as {merged / 'lorafuse_merge.json'} records them" in out
    assert f"{root / 'a'} (weight 0.5), {root / 'b'} (weight 2)" in out and "PASSED" in out


def test_a_recorded_merge_still_fails_a_changed_tensor(merge, tmp_path):
    _root, merged = merge
    copy = shutil.copytree(merged, tmp_path / "merged")
    state = load_file(copy / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key] + 1e-3
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    report = verify(copy, outputs=False)
    assert not report.passed and [f.name for f in report.failures] == [key]


def test_the_weights_recorded_are_the_ones_checked(merge, tmp_path):
    """Editing the record's weight makes the check fail: the weights really come from it."""
    _root, merged = merge
    copy = shutil.copytree(merged, tmp_path / "merged")
    record = json.loads((copy / "lorafuse_merge.json").read_text())
    record["adapters"][1]["weight"] = 1.0
    (copy / "lorafuse_merge.json").write_text(json.dumps(record))
    assert not verify(copy, outputs=False).passed


def test_a_changed_adapter_is_refused(merge, tmp_path):
    root, merged = merge
    moved = shutil.copytree(root, tmp_path / "moved")  # the same relative layout, elsewhere
    record = json.loads((moved / "merged" / "lorafuse_merge.json").read_text())
    record["cwd"] = str(moved)
    (moved / "merged" / "lorafuse_merge.json").write_text(json.dumps(record))
    assert verify(moved / "merged", outputs=False).passed
    state = load_file(moved / "b" / "adapter_model.safetensors")
    state = {k: v * 1.01 for k, v in state.items()}
    save_file(state, moved / "b" / "adapter_model.safetensors")
    with pytest.raises(LorafuseError, match=r"adapter .*b changed since the merge: the sha256 of adapter_model"):
        verify(moved / "merged", outputs=False)


def test_inputs_no_longer_there_are_refused_with_the_fix(merge, tmp_path, capsys):
    root, merged = merge
    moved = shutil.copytree(root, tmp_path / "moved")
    shutil.rmtree(moved / "a")
    record = json.loads((moved / "merged" / "lorafuse_merge.json").read_text())
    record["cwd"] = str(moved)
    (moved / "merged" / "lorafuse_merge.json").write_text(json.dumps(record))
    assert main(["verify", str(moved / "merged")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafuse: error: adapter a, which") and "is no longer there" in err
    assert "pass --base and --adapter" in err and len(err.splitlines()) == 1


def test_no_record_a_single_file_and_half_given_inputs_are_refused(merge, llama_untied, tmp_path):
    root, merged = merge
    bare = shutil.copytree(merged, tmp_path / "bare")
    (bare / "lorafuse_merge.json").unlink()
    with pytest.raises(LorafuseError, match="has no lorafuse_merge.json .*pass --base and --adapter"):
        verify(bare, outputs=False)
    single = tmp_path / "merged.safetensors"
    save_file({"w": torch.zeros(2)}, single)
    with pytest.raises(LorafuseError, match="is one file: .*pass --base and --adapter"):
        verify(single, outputs=False)
    with pytest.raises(LorafuseError, match="--base or --weight without --adapter"):
        verify(merged, root / "base", outputs=False)


def test_a_training_folder_merge_verifies_from_its_record(llama_untied, tmp_path):
    """The record names the checkpoint chosen inside a training output folder, not the folder."""
    out = tmp_path / "out"
    make_peft_adapter(llama_untied, out / "checkpoint-2", seed=3, target_modules=["q_proj"])
    make_peft_adapter(llama_untied, out / "checkpoint-12", seed=4, target_modules=["q_proj"])
    lorafuse.merge(llama_untied, [out], tmp_path / "merged")
    report = verify(tmp_path / "merged", outputs=False)
    assert report.passed and report.adapters[0]["path"] == str(out / "checkpoint-12")
