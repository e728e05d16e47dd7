"""Git sources: a shallow clone at a branch, tag or commit, then Git LFS objects for files that are pointers.

User strings (URLs, refs) never reach git as options: they are validated first (:func:`check_url`,
:func:`check_ref`) and passed after ``--`` where git accepts it; checkouts use the resolved commit hash.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import SourceError
from ..io.safetensors_header import is_lfs_pointer

log = logging.getLogger("lorafuse")

# Transports git may use: ext:: and fd:: (remote helpers) run commands or read descriptors, others are not needed.
ALLOWED_PROTOCOLS = ("https", "http", "ssh", "git", "file")
URL_SCHEMES = ("https", "http", "ssh", "git+ssh", "ssh+git", "git", "file")  # git+ssh, ssh+git: git's ssh aliases
ALLOWED_HINT = "use an https://, http://, ssh://, git://, file:// URL or a local path"
SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
HELPER_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)::")
# scp-like address [user@]host:path, as git reads it: a ':' before any '/'.
SCP_RE = re.compile(r"^(?:(?P<user>[^@/]*)@)?(?P<host>[^:/]+):(?P<path>.*)$")
HEX_RE = re.compile(r"^[0-9a-fA-F]{4,64}$")
# What `git check-ref-format` forbids anywhere in a ref, with the words an error names it by.
REF_FORBIDDEN = (
    *((s, f"'{s}'") for s in ("..", "@{", "//", "~", "^", ":", "?", "*", "[")),
    (" ", "a space"),
    ("\\", "a backslash"),
)


def _ref_problem(ref: str) -> str | None:
    """Why ``ref`` cannot be a git branch, tag or commit name (the rules of ``git check-ref-format``), or None."""
    if not ref:
        return "it is empty"
    if ref.startswith("-"):
        return "it starts with '-', so git would read it as an option"
    if any(ord(c) < 32 or ord(c) == 127 for c in ref):
        return "it holds a control character"
    for needle, name in REF_FORBIDDEN:
        if needle in ref:
            return f"it holds {name}"
    if ref == "@":
        return "it is '@' alone"
    if ref.startswith("/") or ref.endswith("/"):
        return "it starts or ends with '/'"
    if ref.endswith("."):
        return "it ends with '.'"
    for part in ref.split("/"):
        if part.startswith("."):
            return f"its part {part!r} starts with '.'"
        if part.endswith(".lock"):
            return f"its part {part!r} ends with '.lock'"
    return None


def check_ref(ref: str, what: str = "git ref") -> None:
    """Refuse a branch/tag/commit that git could not hold as a ref name, or would read as an option.

    Commit hashes (full or abbreviated) pass, being plain names. ``what`` names the value in the error
    (``"adapter ref"``, ``"base revision"``).
    """
    problem = _ref_problem(ref)
    if problem:
        raise SourceError(
            f"{what} {ref!r} is not a git branch, tag or commit ({problem}): give a branch or tag name such as "
            "main or v1.0, or a commit hash"
        )


def check_url(url: str) -> None:
    """Refuse a git URL that git would read as an option, or whose transport is not https/http/ssh/git/file.

    Remote-helper transports (``ext::``, ``fd::``) are refused: ``ext::`` runs any command it is given.
    """
    if url.startswith("-"):
        raise SourceError(f"git URL {url!r} starts with '-', so git would read it as an option: {ALLOWED_HINT}")
    helper, scheme = HELPER_RE.match(url), SCHEME_RE.match(url)
    refused = f"{helper.group(1)}::" if helper else None
    if scheme and scheme.group(1).lower() not in URL_SCHEMES:
        refused = f"{scheme.group(1)}://"
    if refused:
        raise SourceError(f"git URL {url!r} uses the transport '{refused}', which is refused: {ALLOWED_HINT}")
    if scheme:
        try:
            parts = urlsplit(url)
            names = [parts.username or "", parts.hostname or ""]
        except ValueError as exc:  # e.g. an unclosed '[' of an IPv6 host
            raise SourceError(f"git URL {url!r} is malformed ({exc}): {ALLOWED_HINT}") from exc
    else:
        scp = SCP_RE.match(url)
        names = [scp.group("user") or "", scp.group("host"), scp.group("path")] if scp else []
    if any(name.startswith("-") for name in names):
        raise SourceError(
            f"git URL {url!r} has a user, host or path starting with '-' (ssh would read it as an option): "
            + ALLOWED_HINT
        )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Never wait for a password prompt; fetch LFS objects only for the files a merge reads (see pull_lfs).
    env.update(GIT_TERMINAL_PROMPT="0", GIT_LFS_SKIP_SMUDGE="1")
    # Only the plain transports, whatever the URL (or an insteadOf rewrite of it) asks for: no ext::, no fd::.
    # A stricter list the user set is kept.
    user = env.get("GIT_ALLOW_PROTOCOL")
    allowed = [p for p in ALLOWED_PROTOCOLS if user is None or p in user.split(":")]
    env["GIT_ALLOW_PROTOCOL"] = ":".join(allowed)
    return env


# Checkouts never run the LFS filter (a global `filter.lfs.required` would fail them where git-lfs is missing);
# pointers are replaced afterwards by an explicit `git lfs pull` of the files a merge reads.
NO_LFS_FILTER = ["-c", "filter.lfs.smudge=", "-c", "filter.lfs.process=", "-c", "filter.lfs.required=false"]


def _git(args: list[str], cwd: Path | None = None, lfs_filter: bool = False) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None:
        raise SourceError("git is not installed: install git to use git sources (or pass a local folder)")
    command = ["git", *([] if lfs_filter else NO_LFS_FILTER), *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, check=False)


# git's closing advice after a failed remote access: true of every failure, so never the reason to show.
GIT_ADVICE = ("please make sure you have the correct access rights", "and the repository exists.", "hint:")
GIT_GENERIC = ("fatal: could not read from remote repository.",)
ERROR_PREFIXES = ("fatal:", "error:")


def failure_reason(proc: subprocess.CompletedProcess[str]) -> str:
    """The line of a failed git command that says what went wrong, on one line.

    git ends most remote failures with the same advice ("... and the repository exists."); the cause is the
    first ``fatal:``/``error:`` line (``ERROR:`` on GitHub's ssh), else the first line that is not advice.
    """
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    useful = [line for line in lines if not line.lower().startswith(GIT_ADVICE + GIT_GENERIC)]
    errors = [line for line in useful if line.lower().startswith(ERROR_PREFIXES)]
    informative = [line for line in useful if not line.lower().startswith("warning:")]
    chosen = (errors or informative or useful or lines or [f"exit status {proc.returncode}"])[0]
    if chosen.lower().startswith(ERROR_PREFIXES):
        chosen = chosen.split(":", 1)[1].strip()
    return chosen if len(chosen) <= 300 else chosen[:297] + "..."


def clone(url: str, dest: Path, ref: str | None = None, what: str = "git ref") -> str:
    """Clone ``url`` into the new folder ``dest`` at ``ref``; returns the checked-out commit.

    A shallow clone, then ``git fetch --depth 1 origin REF`` and a checkout of ``FETCH_HEAD``, so any branch,
    tag or full commit hash works without the history. When the server refuses a commit fetched by hash (or
    ``ref`` is an abbreviated hash), the history is fetched and ``ref`` checked out from it. ``what`` names
    ``ref`` in errors (``"adapter ref"``, ``"base revision"``).
    """
    check_url(url)
    if ref is not None:
        check_ref(ref, what)
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise SourceError(f"work folder {dest} already exists: use an empty work folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    args = ["clone", "--quiet", "--depth", "1"] + (["--no-checkout"] if ref else []) + ["--", url, str(dest)]
    proc = _git(args)
    if proc.returncode != 0:
        raise SourceError(f"git clone of {url} failed ({failure_reason(proc)}): check the URL and your access to it")
    if ref:
        _checkout(url, dest, ref, what)
    head = _git(["rev-parse", "HEAD"], cwd=dest)
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    log.info("cloned %s at %s (%s)", url, ref or "its default branch", commit)
    return commit


def _commit_of(dest: Path, name: str) -> str | None:
    """The commit hash ``name`` resolves to in the clone ``dest``, or None."""
    proc = _git(["rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], cwd=dest)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _candidates(ref: str) -> list[str]:
    """Names to look ``ref`` up by after a full fetch; none starts with '-', so rev-parse never reads an option."""
    qualified = [f"refs/tags/{ref}", f"refs/remotes/origin/{ref}", f"refs/heads/{ref}", f"refs/remotes/{ref}"]
    return ([ref] if HEX_RE.match(ref) or ref.startswith("refs/") else []) + qualified


def _checkout(url: str, dest: Path, ref: str, what: str) -> None:
    # `--`: the ref is a refspec even if it looked like an option (it was validated too).
    fetched = _git(["fetch", "--quiet", "--depth", "1", "--", "origin", ref], cwd=dest)
    commit = _commit_of(dest, "FETCH_HEAD") if fetched.returncode == 0 else None
    if commit is None:
        # Abbreviated hashes, or servers that refuse fetching a commit by hash: get the history instead.
        # A one-commit repository is cloned complete, and git refuses to --unshallow a complete clone.
        unshallow = ["--unshallow"] if (dest / ".git" / "shallow").exists() else []
        full = _git(
            ["fetch", "--quiet", *unshallow, "--tags", "--", "origin", "+refs/heads/*:refs/remotes/origin/*"], dest
        )
        if full.returncode != 0:
            raise SourceError(f"git fetch of {ref!r} from {url} failed ({failure_reason(fetched)}): check the {what}")
        commit = next(filter(None, (_commit_of(dest, name) for name in _candidates(ref))), None)
        if commit is None:
            raise SourceError(f"{url} has no branch, tag or commit {ref!r}: check the {what}")
    # Checked out by hash: a hexadecimal name is never read as an option.
    proc = _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit], cwd=dest)
    if proc.returncode != 0:
        raise SourceError(f"git checkout of {ref!r} in {dest} failed ({failure_reason(proc)})")


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
    pulled = _git(["lfs", "pull", "--include=" + ",".join(rel)], cwd=repo, lfs_filter=True)
    still = [p for p in pointers if is_lfs_pointer(p)]
    if still:
        reason = failure_reason(pulled if pulled.returncode != 0 else installed)
        raise SourceError(
            f"{still[0].relative_to(repo).as_posix()} in {url} is still a Git LFS pointer after `git lfs pull` "
            f"(the LFS objects are unreachable: {reason}): check access to the repository's LFS storage"
        )
