"""Hugging Face Hub sources, offline: a hand-built huggingface_hub cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects
from sources_helpers import ADAPTER, BASE, make_hf_cache, merged_bytes, reference, scaled_adapter

import lorafuse
from lorafuse.errors import SourceError
from lorafuse.sources import hub, resolve_model


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cache = root / "home" / "hub"  # the layout under HF_HOME
    scaled = scaled_adapter(root / "scaled")
    make_hf_cache(cache, "org/tiny-base", BASE)
    make_hf_cache(cache, "org/tiny-adapter", ADAPTER)
    make_hf_cache(cache, "org/tiny-adapter", scaled, revision="v2")
    return {
        "home": root / "home",
        "cache": cache,
        "ref_orig": reference(root / "ref-orig"),
        "ref_scaled": reference(root / "ref-scaled", scaled),
    }


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set both for this in-process test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hf_base_and_adapter_from_offline_cache(hf_cache, offline, tmp_path):
    report = lorafuse.merge(
        "hf://org/tiny-base", ["hf://org/tiny-adapter"], tmp_path / "out", cache_dir=hf_cache["cache"]
    )
    assert merged_bytes(tmp_path / "out") == hf_cache["ref_orig"]
    assert report.base.startswith(str(hf_cache["cache"] / "models--org--tiny-base" / "snapshots"))
    assert report.sources["adapters"][0]["kind"] == "hf"
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_bare_repo_id_and_revision(hf_cache, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "org/tiny-base" is not a local path here
    lorafuse.merge("org/tiny-base", ["org/tiny-adapter@v2"], tmp_path / "out", cache_dir=hf_cache["cache"])
    assert merged_bytes(tmp_path / "out") == hf_cache["ref_scaled"]
    lorafuse.merge(
        "org/tiny-base", ["hf://org/tiny-adapter"], tmp_path / "out2", cache_dir=hf_cache["cache"], adapter_ref="v2"
    )
    assert merged_bytes(tmp_path / "out2") == hf_cache["ref_scaled"]


def test_cli_honours_hf_home_and_offline_env(hf_cache, tmp_path):
    env = {**os.environ, "HF_HOME": str(hf_cache["home"]), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lorafuse", "merge", "hf://org/tiny-base", "hf://org/tiny-adapter@v2", "-o", out]
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert merged_bytes(out) == hf_cache["ref_scaled"]


def test_repo_missing_from_offline_cache_is_a_source_error(hf_cache, offline, tmp_path):
    with pytest.raises(SourceError, match=r"cannot get hf://org/absent from the Hugging Face Hub .*HF_HUB_OFFLINE=1"):
        resolve_model("hf://org/absent", cache_dir=hf_cache["cache"])
    with pytest.raises(SourceError, match="cannot get hf://org/tiny-base@nope"):
        resolve_model("hf://org/tiny-base@nope", cache_dir=hf_cache["cache"])


def test_missing_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(
        SourceError, match=r"needs huggingface_hub, which is not installed: pip install 'lorafuse\[hub\]'"
    ):
        resolve_model("hf://org/tiny-base")


def _fake_remote(remote, calls):
    """A stand-in for snapshot_download serving ``remote`` with the Hub's pattern filtering."""

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None, ignore_patterns=None):
        calls.append(list(allow_patterns))
        names = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
        dest = remote.parent / f"download-{len(calls)}"
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, dest / name)
        return str(dest)

    return snapshot_download


def _populate(folder, names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")


def test_only_the_files_a_merge_needs_are_downloaded(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    _populate(
        remote,
        ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "tokenizer.model", "merges.txt"]
        + ["chat_template.jinja", "modeling_x.py", "consolidated.safetensors", "optimizer.pt", "training_args.bin"]
        + ["README.md", "original/params.json", "flax_model.msgpack"],
    )
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_remote(remote, calls))
    got = resolve_model("hf://org/m")
    assert sorted(p.name for p in got.rglob("*") if p.is_file()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "merges.txt", "chat_template.jinja"]
        + ["modeling_x.py"]
    )
    assert len(calls) == 1  # safetensors found: the .bin copy is never fetched


def test_bin_only_repo_is_fetched_in_a_second_pass(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    _populate(remote, ["config.json", "pytorch_model.bin", "training_args.bin", "optimizer.bin"])
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_remote(remote, calls))
    got = resolve_model("hf://org/m")
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert len(calls) == 2 and "*.bin" in calls[1]


def test_adapter_subfolder_limits_the_download(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    _populate(remote, ["a/adapter_config.json", "a/adapter_model.safetensors", "b/adapter_model.safetensors"])
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_remote(remote, calls))
    root = hub.hf_snapshot("org/ad", None, None, "adapter", "a")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "a/adapter_config.json",
        "a/adapter_model.safetensors",
    ]


def test_verify_takes_hub_sources(hf_cache, offline, tmp_path, capsys):
    from lorafuse.cli import main
    from lorafuse.verify import verify

    out = tmp_path / "out"
    lorafuse.merge("hf://org/tiny-base", ["hf://org/tiny-adapter"], out, cache_dir=hf_cache["cache"])
    report = verify(out, "hf://org/tiny-base", ["hf://org/tiny-adapter"], cache_dir=hf_cache["cache"], outputs=False)
    assert report.passed and report.tensors_touched > 0
    assert report.base.startswith(str(hf_cache["cache"]))
    cache = ["--cache-dir", str(hf_cache["cache"]), "--no-output-check"]
    assert main(["verify", str(out), "--base", "hf://org/tiny-base", "--adapter", "hf://org/tiny-adapter", *cache]) == 0
    # The same merge checked against the v2 adapter (twice the scale) fails.
    assert main(["verify", str(out), "--base", "org/tiny-base", "--adapter", "org/tiny-adapter@v2", *cache]) == 1
    assert "error" in capsys.readouterr().err
