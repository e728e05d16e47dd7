"""`lorafuse merge` with sources: [BASE] ADAPTER..., --base, --adapter-ref/-subfolder/-config; source parsing."""

from __future__ import annotations

import json
import shutil

import pytest
from sources_helpers import ADAPTER, BASE, make_adapter_repo, merged_bytes, reference, scaled_adapter, write_config

from lorafuse.cli import main
from lorafuse.errors import SourceError
from lorafuse.sources import parse_source


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    scaled = scaled_adapter(root / "scaled")
    adapter = root / "adapter"
    shutil.copytree(ADAPTER, adapter)
    write_config(adapter, base_model_name_or_path=str(BASE))
    return {
        "root": root,
        "adapter": adapter,  # names the base by absolute path
        "scaled": scaled,
        "repo": make_adapter_repo(root, scaled),
        "orig": reference(root / "orig"),
        "scaled_ref": reference(root / "scaled-ref", scaled),
        "both": _both(root),
    }


def _both(root):
    import lorafuse

    lorafuse.merge(BASE, [ADAPTER, root / "scaled"], root / "both")
    return merged_bytes(root / "both")


def test_single_positional_is_the_adapter_and_base_is_reported(env, tmp_path, capsys):
    assert main(["merge", str(env["adapter"]), "-o", str(tmp_path / "out")]) == 0
    assert merged_bytes(tmp_path / "out") == env["orig"]
    err = capsys.readouterr().err
    assert f"base model {BASE}, from base_model_name_or_path in the adapter_config.json of {env['adapter']}" in err


def test_first_positional_that_is_an_adapter_folder_means_no_base(env, tmp_path):
    assert main(["merge", str(env["adapter"]), str(env["scaled"]), "-o", str(tmp_path / "out")]) == 0
    assert merged_bytes(tmp_path / "out") == env["both"]


def test_base_positional_and_base_flag(env, tmp_path):
    assert main(["merge", str(BASE), str(ADAPTER), str(env["scaled"]), "-o", str(tmp_path / "a")]) == 0
    assert main(["merge", "--base", str(BASE), str(ADAPTER), str(env["scaled"]), "-o", str(tmp_path / "b")]) == 0
    assert merged_bytes(tmp_path / "a") == merged_bytes(tmp_path / "b") == env["both"]


def test_git_adapter_with_ref_and_subfolder_flags(env, tmp_path, capsys):
    url = env["repo"]["url"]
    args = ["merge", str(BASE), url, "-o", str(tmp_path / "out"), "--json"]
    assert main([*args, "--adapter-ref", "nested", "--adapter-subfolder", "out/final"]) == 0
    assert merged_bytes(tmp_path / "out") == env["orig"]
    report = json.loads(capsys.readouterr().out)
    assert report["sources"]["adapters"][0]["commit"] == env["repo"]["nested"]
    assert report["adapters"][0]["format"] == "peft"


def test_one_ref_per_adapter(env, tmp_path):
    url = env["repo"]["url"]
    out = str(tmp_path / "out")
    assert main(["merge", str(BASE), url, url, "-o", out, "--adapter-ref", "v1", "--adapter-ref", "main"]) == 0
    assert merged_bytes(tmp_path / "out") == env["both"]
    three = ["--adapter-ref", "v1", "--adapter-ref", "v1", "--adapter-ref", "v1"]
    assert main(["merge", str(BASE), url, url, "-o", str(tmp_path / "x"), *three]) == 1


def test_adapter_config_flag(env, tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTER_CONFIG_JSON", raising=False)
    monkeypatch.delenv("ADAPTER_CONFIG_PATH", raising=False)
    weights = tmp_path / "w"
    weights.mkdir()
    shutil.copy(ADAPTER / "adapter_model.safetensors", weights)
    out = str(tmp_path / "out")
    assert main(["merge", str(BASE), str(weights), "-o", out]) == 1
    cfg = str(ADAPTER / "adapter_config.json")
    assert main(["merge", str(BASE), str(weights), "-o", out, "--adapter-config", cfg]) == 0
    assert merged_bytes(tmp_path / "out") == env["orig"]


def test_verify_after_merge_of_a_git_adapter(env, tmp_path, capsys):
    # --verify re-reads the adapter after the merge: the clone must still exist then.
    out = str(tmp_path / "out")
    assert main(["merge", str(BASE), env["repo"]["url"], "-o", out, "--adapter-ref", "v1", "--verify", "--json"]) == 0
    assert "verify" in json.loads(capsys.readouterr().out)


def test_nonempty_output_is_refused_before_any_clone(env, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["merge", str(BASE), "file:///nonexistent/repo.git", "-o", str(tmp_path / "out")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "kind", "location", "revision"),
    [
        ("hf://Qwen/Qwen3-4B@v1", "hf", "Qwen/Qwen3-4B", "v1"),
        ("ms://Qwen/Qwen3-4B", "ms", "Qwen/Qwen3-4B", None),
        ("Qwen/Qwen3-4B", "hf", "Qwen/Qwen3-4B", None),
        ("https://example.com/org/adapter.git", "git", "https://example.com/org/adapter.git", None),
        ("git@github.com:org/adapter.git", "git", "git@github.com:org/adapter.git", None),
        ("file:///srv/adapter.git", "git", "file:///srv/adapter.git", None),
        ("./Qwen/Qwen3-4B", "local", "./Qwen/Qwen3-4B", None),
        ("/models/base", "local", "/models/base", None),
        ("a/b/c", "local", "a/b/c", None),
    ],
)
def test_parse_source(text, kind, location, revision, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = parse_source(text)
    assert (src.kind, src.location, src.revision) == (kind, location, revision)


def test_parse_source_prefers_an_existing_local_path_and_checks_revisions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen3-4B").mkdir(parents=True)
    assert parse_source("Qwen/Qwen3-4B").kind == "local"
    assert parse_source("org/x", default_hub="ms").kind == "ms"
    with pytest.raises(SourceError, match="revision 'a' in the name and 'b' given separately"):
        parse_source("hf://org/x@a", revision="b")
    with pytest.raises(SourceError, match="empty revision"):
        parse_source("hf://org/x@")
    with pytest.raises(SourceError, match="is not a repository id"):
        parse_source("hf://just-a-name")
