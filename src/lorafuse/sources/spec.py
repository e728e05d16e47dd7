"""Tell what kind of source a user string names: a local path, a Hub or ModelScope repo, or a git URL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from .git import HELPER_RE, SCHEME_RE, check_url

KINDS = ("local", "hf", "ms", "git")
HUB_SCHEMES = {"hf://": "hf", "ms://": "ms"}
GIT_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://", "git+ssh://", "ssh+git://")
# ORG/NAME as both hubs spell repo ids (no leading dot, no further slashes).
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# scp-like git address: user@host:path (git@github.com:org/repo.git).
SCP_GIT_RE = re.compile(r"^[\w.-]+@[\w.-]+:(?!//).+")


@dataclass(frozen=True)
class Source:
    """A parsed source: ``kind`` is one of :data:`KINDS`; ``location`` a path, repo id or URL."""

    kind: str
    location: str
    revision: str | None = None
    text: str = ""

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        if self.kind in ("hf", "ms"):
            return f"{self.kind}://{self.location}{rev}"
        return f"{self.location}{rev}" if self.kind == "git" else self.location


def _split_revision(repo: str, text: str) -> tuple[str, str | None]:
    repo, sep, rev = repo.partition("@")
    if sep and not rev:
        raise SourceError(f"{text}: empty revision after '@': write ORG/NAME@REVISION or drop the '@'")
    if not REPO_ID_RE.match(repo):
        raise SourceError(f"{text}: {repo!r} is not a repository id: write ORG/NAME")
    return repo, rev or None


def _merge_revision(found: str | None, given: str | None, text: str) -> str | None:
    if found and given and found != given:
        raise SourceError(f"{text}: revision {found!r} in the name and {given!r} given separately: keep one")
    return found or given or None


def parse_source(text: str | Path, default_hub: str = "hf", revision: str | None = None) -> Source:
    """Classify ``text``; ``default_hub`` (``"hf"`` or ``"ms"``) decides what a bare ``ORG/NAME`` means.

    A path that exists locally always wins over a repo id of the same spelling, as in transformers.
    ``revision`` is a branch, tag or commit given separately (``--base-revision``, ``--adapter-ref``).
    """
    if isinstance(text, Path):
        return Source("local", str(text), revision, str(text))
    text = str(text)
    if not text:
        raise SourceError("empty source: give a local path, hf://ORG/NAME, ms://ORG/NAME or a git URL")
    for scheme, kind in HUB_SCHEMES.items():
        if text.startswith(scheme):
            repo, rev = _split_revision(text[len(scheme) :].strip("/"), text)
            return Source(kind, repo, _merge_revision(rev, revision, text), text)
    if text.startswith(GIT_SCHEMES) or SCP_GIT_RE.match(text):
        check_url(text)
        return Source("git", text, revision, text)
    if Path(text).expanduser().exists():
        return Source("local", text, revision, text)
    if SCHEME_RE.match(text) or HELPER_RE.match(text):
        check_url(text)  # a transport git would use but lorafuse refuses (ext::, fd::, ftp://): say so by name
    if not text.startswith((".", "/", "~")) and REPO_ID_RE.match(text.partition("@")[0]):
        repo, rev = _split_revision(text, text)
        return Source(default_hub, repo, _merge_revision(rev, revision, text), text)
    return Source("local", text, revision, text)
