"""Hostile git input: refs, revisions and URLs that look like git options or run commands (issue 15, item 1).

Every hostile value must end in one error line naming it, a non-zero exit, no marker file (the payload never
ran), inputs byte for byte unchanged and nothing left behind. Local bare repos are served over file://, where
git runs ``--upload-pack`` through a shell, so an option that reached git would really create the marker.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hostile import Result, assert_no_litter, assert_refused, run_command, snapshot
from sources_helpers import ADAPTER, BASE, adapter_repos, git, merged_bytes

from lorafuse.errors import SourceError
from lorafuse.sources import git as git_source
from lorafuse.sources import parse_source


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """The adapter repo of sources_helpers, plus the tiny base as a bare repo and as a local checkout."""
    root = tmp_path_factory.mktemp("hostile-git")
    info = adapter_repos(root)
    bare, work = root / "base.git", root / "base-work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    shutil.copytree(BASE, work)
    git("init", "-q", "-b", "main", str(work))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "base", cwd=work)
    git("push", "-q", bare.as_uri(), "main", cwd=work)
    info.update(root=root, base_url=bare.as_uri(), base_checkout=work)
    return info


class Scene:
    """A run folder (cwd, holds the output), a private TMPDIR and the marker a payload would create."""

    def __init__(self, tmp_path, repos):
        self.run, self.tmp = tmp_path / "run", tmp_path / "tmp"
        self.run.mkdir()
        self.tmp.mkdir()
        self.marker = tmp_path / "PWNED"
        self.inputs = (repos["root"], BASE, ADAPTER)
        self.before = snapshot(*self.inputs)

    def payload(self) -> str:
        return f"--upload-pack=touch {self.marker};true"

    def lorafuse(self, *args) -> Result:
        env = {"TMPDIR": str(self.tmp)}
        return run_command("lorafuse", "merge", "-o", self.run / "out", *args, cwd=self.run, env=env)

    def merge_adapter(self, *args, env: dict | None = None) -> Result:
        flags = ["--work_dir", self.run / "work", "--output_dir", self.run / "out", "--cache_dir", self.run / "cache"]
        result = run_command("merge-adapter", *flags, *args, cwd=self.run, env={"TMPDIR": str(self.tmp), **(env or {})})
        # merge-adapter reports on stdout ("[merge_adapter] FAILED: ..."), as the script it replaces did.
        return Result(result.code, "", result.out + result.err)

    def assert_clean(self, allowed_in_run: set[str] | None = None) -> None:
        assert not self.marker.exists(), "a hostile value reached git as an option: the payload ran"
        assert snapshot(*self.inputs) == self.before, "an input changed"
        assert_no_litter(self.run, allowed_in_run)
        assert_no_litter(self.tmp)


@pytest.fixture
def scene(tmp_path, repos):
    return Scene(tmp_path, repos)


def _merge_adapter_clean(scene: Scene) -> None:
    # merge-adapter may prepare its --work_dir (holding only its marker) before the sources are checked; nothing
    # may ever be cloned into it.
    scene.assert_clean({"work"})
    work = scene.run / "work"
    assert not work.exists() or sorted(p.name for p in work.iterdir()) == [".lorafuse-work"]


# --- refs and revisions --------------------------------------------------------------------------------------


def test_adapter_ref_payload_is_refused_by_merge(scene, repos):
    payload = scene.payload()
    line = assert_refused(scene.lorafuse(BASE, repos["url"], f"--adapter-ref={payload}"), payload, "adapter ref")
    assert "starts with '-'" in line
    scene.assert_clean()


def test_base_revision_payload_of_a_git_base_is_refused_by_merge(scene, repos):
    payload = scene.payload()
    assert_refused(scene.lorafuse(repos["base_url"], ADAPTER, f"--base-revision={payload}"), payload, "base revision")
    scene.assert_clean()


def test_base_revision_payload_of_a_local_git_checkout_is_refused(scene, repos):
    payload = scene.payload()
    result = scene.lorafuse(repos["base_checkout"], ADAPTER, f"--base-revision={payload}")
    assert_refused(result, payload, "base revision")
    scene.assert_clean()


def test_revision_from_an_adapter_config_is_refused(scene, repos, tmp_path):
    """An adapter whose config names a git base at a hostile revision: the base comes from that config."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=repos["base_url"], revision=scene.payload())
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    scene.inputs += (adapter,)
    scene.before = snapshot(*scene.inputs)
    assert_refused(scene.lorafuse(adapter), scene.payload(), "base revision")
    scene.assert_clean()


def test_merge_adapter_ref_flag_payload_is_refused(scene, repos):
    payload = scene.payload()
    result = scene.merge_adapter("--base_model", BASE, "--adapter_repo_url", repos["url"], f"--adapter_ref={payload}")
    assert_refused(result, "FAILED", payload)
    _merge_adapter_clean(scene)


def test_merge_adapter_ref_environment_payload_is_refused(scene, repos):
    payload = scene.payload()
    env = {"ADAPTER_REPO_URL": repos["url"], "ADAPTER_REPO_REF": payload}
    assert_refused(scene.merge_adapter("--base_model", BASE, env=env), "FAILED", payload)
    _merge_adapter_clean(scene)


def test_merge_adapter_base_revision_environment_payload_is_refused(scene, repos):
    payload = scene.payload()
    env = {"BASE_MODEL": repos["base_url"], "BASE_REVISION": payload, "ADAPTER_REPO_URL": str(ADAPTER)}
    assert_refused(scene.merge_adapter(env=env), "FAILED", payload)
    _merge_adapter_clean(scene)


def test_verbose_as_ref_does_not_merge_the_default_branch(scene, repos):
    assert_refused(scene.lorafuse(BASE, repos["url"], "--adapter-ref=--verbose"), "'--verbose'")
    scene.assert_clean()
    env = {"ADAPTER_REPO_URL": repos["url"], "ADAPTER_REPO_REF": "--verbose"}
    assert_refused(scene.merge_adapter("--base_model", BASE, env=env), "FAILED", "'--verbose'")
    _merge_adapter_clean(scene)


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("-u", "starts with '-'"),
        ("main..v1", "'..'"),
        ("main v1", "a space"),
        ("main~1", "'~'"),
        ("v1^{tree}", "'^'"),
        ("a:b", "':'"),
        ("ma?n", "'?'"),
        ("m*", "'*'"),
        ("[main]", "'['"),
        ("a\\b", "backslash"),
        ("main\n--verbose", "control character"),
        ("@{-1}", "'@{'"),
        ("@", "'@'"),
        ("/main", "'/'"),
        ("main/", "'/'"),
        ("a//b", "'//'"),
        ("main.", "'.'"),
        ("heads/.hidden", "'.'"),
        ("main.lock", "'.lock'"),
        ("", "empty"),
    ],
)
def test_refs_git_cannot_hold_are_refused_naming_the_reason(ref, reason):
    with pytest.raises(SourceError, match="adapter ref") as caught:
        git_source.check_ref(ref, "adapter ref")
    message = str(caught.value)
    assert "\n" not in message and repr(ref) in message and reason in message, message


@pytest.mark.parametrize("ref", ["main", "v1.0", "feature/x-y_z", "refs/pull/12/head", "0123abcd", "a" * 40, "HEAD"])
def test_legit_refs_pass_validation(ref):
    git_source.check_ref(ref, "adapter ref")


def test_a_ref_that_passes_validation_still_cannot_become_an_option(repos, tmp_path, monkeypatch):
    """Defence in depth: even with validation switched off, git gets the ref after `--`, never as an option."""
    marker = tmp_path / "PWNED"
    monkeypatch.setattr(git_source, "check_ref", lambda ref, what="git ref": None)
    with pytest.raises(SourceError, match="no branch, tag or commit"):
        git_source.clone(repos["url"], tmp_path / "c", f"--upload-pack=touch {marker};true")
    assert not marker.exists()


# --- URLs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "--upload-pack=touch {marker};true",
        "-utouch {marker};true",
        "ext::sh -c touch% {marker}",
        "fd::3",
        "ssh://-oProxyCommand=touch%20{marker}/repo.git",
        "gopher://example.com/repo.git",
    ],
)
def test_hostile_adapter_url_is_refused(scene, url):
    url = url.format(marker=scene.marker)
    # `--` so that argparse hands an option-like value over as the positional adapter.
    result = scene.lorafuse("--base", BASE, "--", url)
    assert_refused(result, url)
    scene.assert_clean()
    result = scene.merge_adapter("--base_model", BASE, env={"ADAPTER_REPO_URL": url})
    assert_refused(result, "FAILED", url)
    _merge_adapter_clean(scene)


@pytest.mark.parametrize(
    "url", ["--upload-pack=touch {marker};true", "ext::sh -c touch% {marker}", "fd::3", "ftp://example.com/r.git"]
)
def test_clone_refuses_hostile_urls_itself(tmp_path, url):
    url = url.format(marker=tmp_path / "PWNED")
    with pytest.raises(SourceError, match=r"https://, http://, ssh://, git://, file:// URL or a local path"):
        git_source.clone(url, tmp_path / "c")
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "c").exists()


def test_git_environment_disables_the_ext_transport(tmp_path, monkeypatch):
    """Defence in depth: git run by lorafuse refuses ext:: even asked directly, and even where the user's git
    configuration allows it (git's own default already refuses it, so the test turns it on first)."""
    for key, value in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "protocol.ext.allow"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "always")
    monkeypatch.delenv("GIT_ALLOW_PROTOCOL", raising=False)
    marker = tmp_path / "PWNED"
    proc = git_source._git(["clone", "--", f"ext::sh -c touch% {marker}", str(tmp_path / "c")])
    assert proc.returncode != 0
    assert not marker.exists()
    assert git_source._env()["GIT_ALLOW_PROTOCOL"] == "https:http:ssh:git:file"
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "https:ext")  # a stricter list of the user's stays, less ext
    assert git_source._env()["GIT_ALLOW_PROTOCOL"] == "https"


def test_ext_url_is_not_a_local_path_or_repo_id():
    with pytest.raises(SourceError, match="'ext::'"):
        parse_source("ext::sh -c id")


# --- missing repositories ------------------------------------------------------------------------------------


def test_missing_repository_reports_gits_meaningful_line(scene, repos, tmp_path):
    url = (tmp_path / "missing.git").as_uri()
    line = assert_refused(scene.lorafuse(BASE, url), url, "does not appear to be a git repository", "check the URL")
    assert "repository exists" not in line
    scene.assert_clean()
    result = scene.merge_adapter("--base_model", BASE, "--adapter_repo_url", url)
    line = assert_refused(result, "FAILED", url, "does not appear to be a git repository")
    assert "repository exists" not in line
    _merge_adapter_clean(scene)


@pytest.mark.parametrize(
    ("stderr", "expect"),
    [
        (
            "remote: Repository not found.\nfatal: repository 'https://github.com/o/n/' not found\n",
            "repository 'https://github.com/o/n/' not found",
        ),
        (
            "ERROR: Repository not found.\nfatal: Could not read from remote repository.\n\nPlease make sure you have "
            "the correct access rights\nand the repository exists.\n",
            "Repository not found.",
        ),
        (
            "git@github.com: Permission denied (publickey).\r\nfatal: Could not read from remote repository.\n\n"
            "Please make sure you have the correct access rights\nand the repository exists.\n",
            "git@github.com: Permission denied (publickey).",
        ),
        ("warning: redirecting to https://x/\nfatal: couldn't find remote ref v9\n", "couldn't find remote ref v9"),
        ("", "exit status 128"),
    ],
)
def test_git_failure_reason_is_the_meaningful_line(stderr, expect):
    proc = subprocess.CompletedProcess(["git"], 128, "", stderr)
    assert git_source.failure_reason(proc) == expect


def test_local_path_with_a_ref_that_does_not_exist_says_so(scene, tmp_path):
    missing = tmp_path / "no-such-checkout"
    assert_refused(scene.lorafuse(BASE, missing, "--adapter-ref=v1"), str(missing), "does not exist")
    scene.assert_clean()


# --- legit refs still work -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "expect"), [("v1", "ref_orig"), ("main", "ref_scaled"), ("v1-commit", "ref_orig")])
def test_legit_refs_still_merge_through_the_commands(scene, repos, ref, expect):
    """A tag, a branch and a full commit hash, through `lorafuse merge --adapter-ref` and ADAPTER_REPO_REF."""
    ref = repos["v1"] if ref == "v1-commit" else ref
    result = scene.lorafuse(BASE, repos["url"], f"--adapter-ref={ref}")
    assert result.code == 0, result.err
    assert merged_bytes(scene.run / "out") == repos[expect]
    shutil.rmtree(scene.run / "out")
    env = {"ADAPTER_REPO_URL": repos["url"], "ADAPTER_REPO_REF": ref}
    result = scene.merge_adapter("--base_model", BASE, env=env)
    assert result.code == 0, result.out
    assert merged_bytes(scene.run / "out") == repos[expect]
    assert not scene.marker.exists()
    assert snapshot(*scene.inputs) == scene.before


def test_abbreviated_hash_of_a_one_commit_repository_is_found(tmp_path):
    """A one-commit repo is cloned complete (git refuses --unshallow then): the hash is found all the same."""
    bare, work = tmp_path / "one.git", tmp_path / "one-work"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    shutil.copytree(ADAPTER, work)
    git("init", "-q", "-b", "main", str(work))
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "only", cwd=work)
    git("push", "-q", bare.as_uri(), "main", cwd=work)
    commit = git("rev-parse", "HEAD", cwd=work)
    assert git_source.clone(bare.as_uri(), tmp_path / "c", commit[:8]) == commit
