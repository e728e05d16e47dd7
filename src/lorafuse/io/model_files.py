"""Which files of a model folder hold its weights, and where links in a model folder may lead (torch-free: the CLI
uses it before ``import torch``).

The link rule, for every file lorafuse reads from a model folder as weights or copies into an output: a symlink is
followed only when its real target lies inside the folder itself, or, for a Hugging Face cache snapshot
(``<cache>/models--ORG--NAME/snapshots/<rev>/...``, where huggingface_hub makes every file a link to
``../../blobs/<hash>``), inside that cache repository's ``blobs/`` folder. The boundary is the folder the files were
found in, never a folder above it: a git clone recreates any link its repository holds, and a link such as
``tokenizer.json -> /home/me/.ssh/id_rsa`` would otherwise put a private file into an output people publish. A link
out of the folder, a broken link and a symlink loop are :class:`~lorafuse.errors.InputError` naming the link.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError

WEIGHT_INDEX_RE = re.compile(r"^(?P<prefix>.+)\.(safetensors|bin)\.index\.json$")
SHARD_RE = re.compile(r"^(?P<prefix>.+?)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")
KNOWN_WEIGHT_PREFIXES = ("model", "pytorch_model", "diffusion_pytorch_model", "adapter_model")
# huggingface_hub names a cached repository "<type>s--<org>--<name>" and keeps file contents in its blobs/ folder.
HF_CACHE_REPO_RE = re.compile(r"^(models|datasets|spaces)--.")
# Real index files hold one line per tensor (a few MB for the largest models); anything far larger is not one.
MAX_INDEX_BYTES = 64 << 20


def shown(path: str | os.PathLike) -> str:
    """A path for a one-line message: as it is, or quoted with escapes when it holds a newline or other control."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def link_roots(folder: Path) -> tuple[Path, ...]:
    """The real folders links in model folder ``folder`` may lead into: the folder itself, plus the cache
    repository's ``blobs/`` when ``folder`` is (inside) a Hugging Face cache snapshot."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    for snapshot in (real, *real.parents):
        snapshots, repo = snapshot.parent, snapshot.parent.parent
        if snapshot != snapshots and snapshots.name == "snapshots" and HF_CACHE_REPO_RE.match(repo.name):
            if (repo / "blobs").is_dir():
                roots.append(repo / "blobs")
            break
    return tuple(roots)


def real_path(path: Path, folder: Path, roots: tuple[Path, ...] | None = None) -> Path:
    """The real location of ``path``, a file or folder in model folder ``folder``, after checking its links.

    Raises InputError naming ``path`` for a symlink loop, a broken link, or a link to somewhere outside ``roots``
    (default: :func:`link_roots` of ``folder``).
    """
    try:
        os.stat(path)
    except ValueError as exc:  # a NUL byte or an unencodable character in the name
        raise InputError(f"{shown(path)} is not a usable file name ({exc})") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{shown(path)} is a symlink loop: replace it with the file it should point to") from exc
        if os.path.islink(path):
            raise InputError(
                f"{shown(path)} is a broken link (to {shown(os.readlink(path))}): put the file it points to in place, "
                "or download the model again"
            ) from exc
        raise InputError(f"cannot read {shown(path)} ({exc.strerror})") from exc
    real = Path(os.path.realpath(path))
    if not any(real == root or real.is_relative_to(root) for root in roots or link_roots(folder)):
        raise InputError(
            f"{shown(path)} links to {shown(real)}, outside the model folder {shown(folder)}: put the file itself into "
            "the folder (lorafuse follows no link out of a model folder)"
        )
    return real


def is_inside(path: Path, folder: Path) -> bool:
    """True when ``path`` is a regular file whose links (if any) stay inside model folder ``folder``."""
    try:
        return real_path(path, folder).is_file()
    except InputError:
        return False


def _regular_file(path: Path, folder: Path, roots: tuple[Path, ...], what: str) -> Path:
    """The real path of ``path``, checked as :func:`real_path` does, and a regular file (not a folder or FIFO)."""
    real = real_path(path, folder, roots)
    if not real.is_file():
        raise InputError(f"{what} {shown(path)} is not a regular file: remove it or put the file in its place")
    return real


def _load_index_json(index: Path) -> Any:
    try:
        with open(index, "rb") as handle:
            raw = handle.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {shown(index)} ({exc.strerror})") from exc
    if len(raw) > MAX_INDEX_BYTES:
        raise InputError(f"{shown(index)} is over {MAX_INDEX_BYTES >> 20} MiB, too large for a weight index")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays or objects
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{shown(index)} is not valid JSON ({reason}): download it again") from exc


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_weight_index(index: Path, folder: Path | None = None, roots: tuple[Path, ...] | None = None) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` / ``*.bin.index.json`` names, in order of first mention.

    ``weight_map`` must map tensor names to shard file names of the index's format that lie inside the model
    folder (``folder``, default the index's folder; links checked as :func:`real_path` does); a value that is not
    such a name, points outside the folder, or names a missing file is an InputError naming the index and entry.
    """
    index = Path(index)
    folder = Path(folder) if folder is not None else index.parent
    roots = roots or link_roots(folder)
    _regular_file(index, folder, roots, "weight index")
    data = _load_index_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(
            f"{shown(index)} is not a valid weight index (needs a 'weight_map' object of tensor name -> shard file): "
            "download it again"
        )
    if not weight_map:
        raise InputError(f"{shown(index)} has an empty 'weight_map': download it again")
    suffix = ".bin" if index.name.endswith(".bin.index.json") else ".safetensors"
    checked: set[str] = set()
    files: list[Path] = []
    real_files: set[Path] = set()  # "x.safetensors" and "./x.safetensors" are one file
    for tensor, shard in weight_map.items():
        if isinstance(shard, str) and shard in checked:
            continue
        entry = f"{shown(index)}: weight_map entry {_short(tensor)}"
        if not isinstance(shard, str) or not shard.strip() or "\x00" in shard:
            raise InputError(f"{entry} is {_short(shard)}, not a shard file name: fix or download the index again")
        if PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts:
            raise InputError(f"{entry} points outside the model folder ({_short(shard)}): download the index again")
        if not shard.endswith(suffix):
            raise InputError(f"{entry} names {_short(shard)}, not a {suffix} file: fix or download the index again")
        path = folder / shard
        if not os.path.lexists(path):
            raise InputError(
                f"{shown(index)} lists {shown(shard)}, which is missing from {shown(folder)}: download it again"
            )
        try:
            real = _regular_file(path, folder, roots, "weight file")
        except InputError as exc:  # a link out of the folder, broken or looping: name the index entry too
            raise InputError(f"{entry}: {exc}") from exc
        checked.add(shard)
        if real not in real_files:
            real_files.add(real)
            files.append(path)
    return files


def find_model_weights(folder: Path) -> tuple[list[Path], str, Path | None]:
    """Weight files of a model folder: (files in order, file-name prefix, index file or None).

    Prefers safetensors over .bin, an index over a glob; ignores adapter files and other folders. Every weight file
    (and index entry) must stay inside the folder as the module docstring says.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model folder {shown(folder)} does not exist")
    roots = link_roots(folder)

    def checked(files: list[Path]) -> list[Path]:
        for path in files:
            _regular_file(path, folder, roots, "weight file")
        return files

    for suffix in (".safetensors", ".bin"):
        indexes = sorted(p for p in folder.glob(f"*{suffix}.index.json") if WEIGHT_INDEX_RE.match(p.name))
        if indexes:
            index = indexes[0]
            files = read_weight_index(index, folder, roots)
            prefix = WEIGHT_INDEX_RE.match(index.name).group("prefix")  # type: ignore[union-attr]
            return files, prefix, index
        for prefix in KNOWN_WEIGHT_PREFIXES:
            if prefix == "adapter_model":
                continue
            files = sorted(folder.glob(f"{prefix}{suffix}")) or sorted(folder.glob(f"{prefix}-*-of-*{suffix}"))
            if files:
                return checked(files), prefix, None
        files = sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith("adapter_"))
        if suffix == ".safetensors" and files:
            match = SHARD_RE.match(files[0].name)
            return checked(files), match.group("prefix") if match else "model", None
    listing = ", ".join(shown(n) for n in sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
    raise InputError(
        f"{shown(folder)} holds no model weights (*.safetensors or pytorch_model*.bin); it holds: {listing}"
    )
