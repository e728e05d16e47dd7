"""Turn a model or adapter source into a local folder: local paths as they are, downloads and clones otherwise."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, SourceError
from ..io.model_files import real_path
from . import adapter_config as ac
from .git import check_ref, clone, pull_lfs
from .hub import hf_snapshot
from .modelscope import ms_snapshot
from .spec import Source, parse_source
from .training import training_choice

log = logging.getLogger("lorafuse")


@dataclass
class Resolved:
    """A source fetched to local disk: ``path`` is what the merge reads; ``info`` goes into provenance."""

    path: Path
    source: Source
    info: dict[str, Any] = field(default_factory=dict)


WorkDir = str | Path | Callable[[], Path] | None


def _work(work_dir: WorkDir) -> Path:
    """The work folder: the one given, the one a callable makes on first use, else a new temporary folder."""
    if callable(work_dir):
        return work_dir()
    if work_dir is not None:
        return Path(work_dir)
    path = Path(tempfile.mkdtemp(prefix="lorafuse-work-"))
    log.info("work folder %s made (remove it when done, or pass work_dir)", path)
    return path


def _once(work_dir: str | Path | None) -> WorkDir:
    """``work_dir``, or a callable making one temporary folder on first use (a clone and a config share it)."""
    if work_dir is not None:
        return work_dir
    made: list[Path] = []

    def make() -> Path:
        if not made:
            made.append(_work(None))
        return made[0]

    return make


def _local_git(src: Source, ref: str, work_dir: WorkDir, name: str, what: str, ref_name: str) -> tuple[Path, str]:
    path = Path(src.location).expanduser()
    if not path.exists():
        raise InputError(
            f"{what} {path} does not exist: give an existing git checkout, or a git URL, with {ref_name} {ref!r}"
        )
    if not ((path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir())):
        raise SourceError(f"{what} {path} is a folder, not a git repository, so revision {ref!r} cannot be checked out")
    dest = _work(work_dir) / name
    # A file:// URL of the absolute path: a folder named like an option never reaches git as one.
    return dest, clone(path.resolve().as_uri(), dest, ref, ref_name)


def fetch(
    src: Source,
    *,
    role: str,
    subfolder: str | None = None,
    cache_dir: str | Path | None = None,
    work_dir: WorkDir = None,
    clone_name: str = "repo",
) -> Resolved:
    """Bring ``src`` to local disk; ``role`` is ``"model"`` or ``"adapter"`` (which files a download needs)."""
    what = "base model" if role == "model" else "adapter"
    revision = src.revision
    info: dict[str, Any] = {"source": src.text, "kind": src.kind}
    if revision:
        info["revision"] = revision
    if src.kind == "hf":
        root = hf_snapshot(src.location, revision, cache_dir, role, subfolder)
    elif src.kind == "ms":
        root = ms_snapshot(src.location, revision, cache_dir, role, subfolder)
    elif src.kind == "git" or (src.kind == "local" and revision):
        # Refused before any work folder is made or git runs (clone checks again, for other callers).
        ref_name = "base revision" if role == "model" else "adapter ref"
        if revision is not None:
            check_ref(revision, ref_name)
        if src.kind == "git":
            root = _work(work_dir) / clone_name
            info["commit"] = clone(src.location, root, revision, ref_name)
        else:
            root, info["commit"] = _local_git(src, revision, work_dir, clone_name, what, ref_name)
    else:
        root = Path(src.location).expanduser() if src.location.startswith("~") else Path(src.location)
        if not root.exists():
            raise InputError(
                f"{what} {src.location} does not exist: give a local path, hf://ORG/NAME[@REV], ms://ORG/NAME[@REV] "
                "or a git URL"
            )
    folder = root / subfolder if subfolder else root
    if subfolder and not folder.exists():
        listing = ", ".join(sorted(p.name for p in root.iterdir() if not p.name.startswith("."))[:20]) or "nothing"
        raise SourceError(f"{src.text} has no sub-folder {subfolder!r}: it holds {listing}")
    if subfolder:
        real_path(folder, root)  # a sub-folder linking out of the repository (a clone recreates links) is refused
    if src.kind == "git" or "commit" in info:
        # A model needs every file (tokenizer files may be in LFS too); an adapter only its own folder's files,
        # not the other checkpoints or optimizer states a training repo may hold below it.
        pull_lfs(root, folder, src.location, recursive=role == "model")
    if subfolder:
        info["subfolder"] = subfolder
    if src.kind != "local" or revision:
        info["path"] = str(folder)
    return Resolved(folder, src, info)


def fetch_adapter(
    text: str | Path,
    *,
    ref: str | None = None,
    subfolder: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    work_dir: WorkDir = None,
    default_hub: str = "hf",
    name: str = "adapter",
    peft: bool = True,
) -> Resolved:
    """:func:`fetch` for an adapter, plus an adapter_config.json from ``config`` or the environment when missing.

    A local trainer's output folder (``checkpoint-<step>/`` sub-folders) stands for its latest checkpoint, or for
    its top-level adapter when it has one (sources/training.py); ``info["training_output"]`` says which.

    ``peft=False`` (another adapter format was asked for) leaves the folder as it is.
    """
    src = parse_source(text, default_hub, ref)
    resolved = fetch(
        src, role="adapter", subfolder=subfolder, cache_dir=cache_dir, work_dir=work_dir, clone_name=f"{name}_repo"
    )
    if peft and src.kind == "local":
        choice = training_choice(resolved.path)  # a trainer's output folder: its latest checkpoint
        if choice is not None:
            log.info(choice.note)
            resolved.path = choice.path
            resolved.info["training_output"] = {"checkpoint": choice.checkpoint, "note": choice.note}
    folder = resolved.path
    if not peft or not folder.is_dir() or (folder / ac.CONFIG_NAME).is_file():
        return resolved
    found = ac.explicit_config(config) if config is not None else ac.env_config()
    if found is None:
        if ac.looks_like_peft_without_config(folder):
            raise SourceError(
                f"{folder} has no {ac.CONFIG_NAME}: pass --adapter-config FILE or set {ac.ENV_JSON} (JSON) "
                f"or {ac.ENV_PATH} (a file)"
            )
        return resolved
    data, origin = found
    from ..formats.peft import find_adapter_weights

    find_adapter_weights(folder)  # no weights at all: say so (listing the folder) before making a work folder
    work = _work(work_dir) / name
    resolved.path = ac.folder_with_config(folder, data, work)
    resolved.info.update(adapter_config=origin, path=str(resolved.path))
    log.info("%s has no %s: using the one from %s", folder, ac.CONFIG_NAME, origin)
    return resolved


def resolve_model(
    text: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    default_hub: str = "hf",
) -> Path:
    """The local folder (or file) of a base model given as a path, ``hf://``/``ms://`` id, bare ``ORG/NAME`` or git URL.

    ``default_hub`` decides whether a bare ``ORG/NAME`` (not an existing path) is a Hub (``"hf"``) or ModelScope
    (``"ms"``) id. Git sources are cloned into ``work_dir`` (a new temporary folder when not given).
    """
    src = parse_source(text, default_hub, revision)
    return fetch(src, role="model", cache_dir=cache_dir, work_dir=work_dir, clone_name="base_repo").path


def resolve_adapter(
    text: str | Path,
    *,
    ref: str | None = None,
    subfolder: str | None = None,
    config: str | Path | Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    default_hub: str = "hf",
) -> Path:
    """The local folder of an adapter (see :func:`fetch_adapter`): ``ref`` is a git branch/tag/commit or Hub
    revision, ``subfolder`` the adapter's folder inside the repo, ``config`` an adapter_config.json to use when the
    adapter has none (else ``ADAPTER_CONFIG_JSON`` / ``ADAPTER_CONFIG_PATH``)."""
    return fetch_adapter(
        text, ref=ref, subfolder=subfolder, config=config, cache_dir=cache_dir, work_dir=_once(work_dir),
        default_hub=default_hub,
    ).path  # fmt: skip
