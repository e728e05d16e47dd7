"""Git sources: a shallow clone at a branch, tag or commit, then Git LFS objects for files that are pointers."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import SourceError
from ..io.safetensors_header import is_lfs_pointer

log = logging.getLogger("lorafuse")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Never wait for a password prompt; fetch LFS objects only for the files a merge reads (see pull_lfs).
    env.update(GIT_TERMINAL_PROMPT="0", GIT_LFS_SKIP_SMUDGE="1")
    return env


# Checkouts never run the LFS filter (a global `filter.lfs.required` would fail them where git-lfs is missing);
# pointers are replaced afterwards by an explicit `git lfs pull` of the files a merge reads.
NO_LFS_FILTER = ["-c", "filter.lfs.smudge=", "-c", "filter.lfs.process=", "-c", "filter.lfs.required=false"]


def _git(args: list[str], cwd: Path | None = None, lfs_filter: bool = False) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None:
        raise SourceError("git is not installed: install git to use git sources (or pass a local folder)")
    command = ["git", *([] if lfs_filter else NO_LFS_FILTER), *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, check=False)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def clone(url: str, dest: Path, ref: str | None = None) -> str:
    """Clone ``url`` into the new folder ``dest`` at ``ref``; returns the checked-out commit.

    A shallow clone, then ``git fetch --depth 1 origin REF`` and a checkout of ``FETCH_HEAD``, so any branch,
    tag or full commit hash works without the history. When the server refuses a commit fetched by hash (or
    ``ref`` is an abbreviated hash), the history is fetched and ``ref`` checked out from it.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise SourceError(f"work folder {dest} already exists: use an empty work folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    args = ["clone", "--quiet", "--depth", "1"] + (["--no-checkout"] if ref else []) + ["--", url, str(dest)]
    proc = _git(args)
    if proc.returncode != 0:
        raise SourceError(f"git clone of {url} failed ({_last_line(proc)}): check the URL and your access to it")
    if ref:
        _checkout(url, dest, ref)
    head = _git(["rev-parse", "HEAD"], cwd=dest)
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    log.info("cloned %s at %s (%s)", url, ref or "its default branch", commit)
    return commit


def _checkout(url: str, dest: Path, ref: str) -> None:
    fetched = _git(["fetch", "--quiet", "--depth", "1", "origin", ref], cwd=dest)
    if fetched.returncode == 0:
        target = "FETCH_HEAD"
    else:
        # Abbreviated hashes, or servers that refuse fetching a commit by hash: get the history instead.
        full = _git(
            ["fetch", "--quiet", "--unshallow", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"], dest
        )
        if full.returncode != 0:
            raise SourceError(f"git fetch of {ref!r} from {url} failed ({_last_line(fetched)}): check --adapter-ref")
        target = next(
            (
                name
                for name in (ref, f"origin/{ref}")
                if _git(["rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], cwd=dest).returncode == 0
            ),
            None,
        )
        if target is None:
            raise SourceError(f"{url} has no branch, tag or commit {ref!r}: check --adapter-ref")
    proc = _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", target], cwd=dest)
    if proc.returncode != 0:
        raise SourceError(f"git checkout of {ref!r} in {dest} failed ({_last_line(proc)})")


def lfs_pointers(folder: Path, recursive: bool = True) -> list[Path]:
    """Files in ``folder`` (or ``folder`` itself, a file), outside ``.git``, that are Git LFS pointers."""
    folder = Path(folder)
    if folder.is_file():
        return [folder] if is_lfs_pointer(folder) else []
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != ".git"] if recursive else []
        found.extend(Path(dirpath) / name for name in filenames if is_lfs_pointer(Path(dirpath) / name))
    return sorted(found)


def pull_lfs(repo: Path, folder: Path, url: str, recursive: bool = True) -> None:
    """Replace the Git LFS pointers in ``folder`` (inside the clone ``repo``) by their objects."""
    pointers = lfs_pointers(folder, recursive)
    if not pointers:
        return
    rel = [p.relative_to(repo).as_posix() for p in pointers]
    if shutil.which("git-lfs") is None:
        raise SourceError(
            f"{rel[0]} in {url} is a Git LFS pointer ({len(rel)} such file(s)) and git-lfs is not installed: "
            "install git-lfs (e.g. apt-get install git-lfs) and run again"
        )
    log.info("fetching %d Git LFS object(s) from %s", len(rel), url)
    installed = _git(["lfs", "install", "--local"], cwd=repo, lfs_filter=True)
    pulled = _git(["lfs", "pull", "--include", ",".join(rel)], cwd=repo, lfs_filter=True)
    still = [p for p in pointers if is_lfs_pointer(p)]
    if still:
        reason = _last_line(pulled if pulled.returncode != 0 else installed)
        raise SourceError(
            f"{still[0].relative_to(repo).as_posix()} in {url} is still a Git LFS pointer after `git lfs pull` "
            f"(the LFS objects are unreachable: {reason}): check access to the repository's LFS storage"
        )
