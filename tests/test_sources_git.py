"""Git sources: file:// bare repos with branches, tags, commits, sub-folders and Git LFS."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from sources_helpers import (
    ADAPTER,
    BASE,
    adapter_repos,
    make_lfs_repo,
    make_pointer_repo,
    merged_bytes,
)

import lorafuse
from lorafuse.errors import SourceError
from lorafuse.sources import git as git_source
from lorafuse.sources import resolve_adapter, resolve_model

# CI installs git-lfs (.ci/run) and must run these; a newcomer's machine may lack it, and then they cannot run.
needs_git_lfs = pytest.mark.skipif(
    shutil.which("git-lfs") is None and not os.environ.get("CI"),
    reason="git-lfs is not installed (apt-get install git-lfs); CI installs it and runs these tests",
)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("git")
    info = adapter_repos(root)
    info["pointer_url"] = make_pointer_repo(root)
    return info


@pytest.mark.parametrize(
    ("ref", "subfolder", "expect"),
    [
        (None, None, "ref_scaled"),  # default branch head
        ("v1", None, "ref_orig"),  # tag
        ("main", None, "ref_scaled"),  # branch
        ("v1-commit", None, "ref_orig"),  # full commit hash
        ("nested", "out/final", "ref_orig"),  # branch + sub-folder
    ],
)
def test_git_adapter_at_ref_merges_like_the_local_copy(repos, tmp_path, ref, subfolder, expect):
    ref = repos["v1"] if ref == "v1-commit" else ref
    report = lorafuse.merge(
        BASE, [repos["url"]], tmp_path / "out", adapter_ref=ref, adapter_subfolder=subfolder, work_dir=tmp_path / "w"
    )
    assert merged_bytes(tmp_path / "out") == repos[expect]
    info = report.sources["adapters"][0]
    assert info["kind"] == "git"
    assert (
        info["commit"]
        == {"ref_orig": repos["nested"] if subfolder else repos["v1"], "ref_scaled": repos["main"]}[expect]
    )
    assert (tmp_path / "w" / "adapter_repo" / ".git").is_dir()


def test_abbreviated_commit_falls_back_to_full_fetch(repos, tmp_path):
    folder = resolve_adapter(repos["url"], ref=repos["v1"][:10], work_dir=tmp_path)
    assert (folder / "adapter_model.safetensors").read_bytes() == (ADAPTER / "adapter_model.safetensors").read_bytes()


def test_git_adapter_without_work_dir_cleans_its_temporary_clone(repos, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    report = lorafuse.merge(BASE, [repos["url"]], tmp_path / "out", adapter_ref="v1")
    assert merged_bytes(tmp_path / "out") == repos["ref_orig"]
    assert report.sources["adapters"][0]["path"].startswith(str(tmp_path / "tmp" / "lorafuse-work-"))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_local_git_repo_with_ref_is_cloned_not_used_in_place(repos, tmp_path):
    work_repo = tmp_path / "checkout"
    shutil.copytree(str(repos["url"]).removeprefix("file://"), work_repo / ".git")
    folder = resolve_adapter(str(work_repo), ref="v1", work_dir=tmp_path / "w")
    assert folder == tmp_path / "w" / "adapter_repo"
    with pytest.raises(SourceError, match="not a git repository"):
        resolve_adapter(str(ADAPTER), ref="v1", work_dir=tmp_path / "w2")


def test_git_base_model_is_cloned(repos, tmp_path):
    from sources_helpers import git

    bare, work = tmp_path / "base.git", tmp_path / "base-work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    shutil.copytree(BASE, work)
    git("init", "-q", "-b", "main", str(work))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "base", cwd=work)
    git("push", "-q", bare.as_uri(), "main", cwd=work)
    path = resolve_model(bare.as_uri(), work_dir=tmp_path / "w")
    lorafuse.merge(path, [ADAPTER], tmp_path / "out")
    assert merged_bytes(tmp_path / "out") == repos["ref_orig"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ref": "no-such-branch"}, "no branch, tag or commit 'no-such-branch'"),
        ({"subfolder": "missing/dir"}, "no sub-folder 'missing/dir': it holds adapter_config.json"),
    ],
)
def test_git_errors_name_the_fix(repos, tmp_path, kwargs, match):
    with pytest.raises(SourceError, match=match):
        resolve_adapter(repos["url"], work_dir=tmp_path, **kwargs)


def test_unreachable_url_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match=r"git clone of .*nothing\.git failed .*check the URL"):
        resolve_adapter((tmp_path / "nothing.git").as_uri(), work_dir=tmp_path / "w")


def test_existing_clone_folder_is_refused(repos, tmp_path):
    (tmp_path / "adapter_repo").mkdir()
    with pytest.raises(SourceError, match="already exists: use an empty work folder"):
        lorafuse.merge(BASE, [repos["url"]], tmp_path / "out", work_dir=tmp_path)


def test_lfs_pointer_without_git_lfs_says_install_it(repos, tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(git_source.shutil, "which", lambda name: None if name == "git-lfs" else real_which(name))
    with pytest.raises(SourceError, match=r"adapter_model.safetensors in .* is a Git LFS pointer .*git-lfs is not"):
        resolve_adapter(repos["pointer_url"], work_dir=tmp_path)


@needs_git_lfs
def test_lfs_pointer_with_unreachable_object_says_so(repos, tmp_path):
    with pytest.raises(SourceError, match=r"still a Git LFS pointer after `git lfs pull` \(the LFS objects are unre"):
        resolve_adapter(repos["pointer_url"], work_dir=tmp_path)


@needs_git_lfs
def test_lfs_adapter_is_pulled_and_merges(repos, tmp_path):
    url = make_lfs_repo(tmp_path)
    report = lorafuse.merge(BASE, [url], tmp_path / "out", work_dir=tmp_path / "w")
    assert merged_bytes(tmp_path / "out") == repos["ref_orig"]
    expected = hashlib.sha256((ADAPTER / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert report.adapters[0]["files"]["adapter_model.safetensors"] == expected
    clone = tmp_path / "w" / "adapter_repo"
    # Only the adapter's own files were pulled; the stray training state below it stays a pointer.
    assert git_source.lfs_pointers(clone) == [clone / "checkpoint-1" / "optimizer.safetensors"]
