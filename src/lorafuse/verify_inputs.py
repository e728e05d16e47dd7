"""What ``lorafuse verify MERGED`` checks against when no adapter is given: the merge that ``MERGED`` records in its
``lorafuse_merge.json`` (base, adapters in order, their weights and formats, the options that change the plan).

A recorded local path is used where it still exists; a download or clone whose local copy is gone is fetched again
from its source at the recorded revision. An adapter whose files no longer have the sha256 the merge recorded, or
an input that can no longer be found, is refused with the fix (pass ``--base`` and ``--adapter``): checking
against other inputs than the merged ones would report a difference that is not the merge's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LorafuseError
from .io.extra_files import read_json
from .report import PROVENANCE_NAME, sha256_file

FIX = "pass --base and --adapter (in merge order, with --weight) to verify against inputs you name"


@dataclass
class RecordedMerge:
    """The inputs of the merge a merged folder records (``record``: the provenance file they were read from)."""

    record: Path
    base: str
    adapters: list[str]
    weights: list[float]
    hashes: list[dict[str, str]]  # per adapter: weight file name -> sha256 at merge time
    adapter_format: str | None
    allow_unmatched: bool
    conv1d_modules: str | None
    part_weights: list[dict[str, float] | None] | None = None  # per adapter, as --part-weight set them

    def describe(self) -> str:
        """The note saying what is verified against, and where that came from."""
        adapters = ", ".join(f"{a} (weight {w:g})" for a, w in zip(self.adapters, self.weights))
        return f"base {self.base} and adapters {adapters}, as {self.record} records them"


def _where(path: str, info: dict[str, Any], what: str, record: Path, cwd: str) -> str:
    """A recorded input: its local path while it exists (a relative one from the merge's working folder ``cwd``),
    else its source (a download or clone at its revision)."""
    local = Path(cwd) / path
    if local.exists():
        return str(local)
    if info.get("kind") in ("hf", "ms", "git"):
        revision = info.get("commit") or info.get("revision")
        source = str(info["source"])
        return f"{source}@{revision}" if revision and "@" not in source and info["kind"] != "git" else source
    raise LorafuseError(f"{what} {path}, which {record} records, is no longer there: {FIX}")


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], record: Path) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise LorafuseError(f"{record} has no valid {key!r} (it was edited or is not lorafuse's): {FIX}")
    return value


def recorded_merge(merged: Path) -> RecordedMerge:
    """The merge ``merged`` records (LorafuseError with the fix when it records none, or not readably)."""
    merged = Path(merged)
    if not merged.is_dir():
        raise LorafuseError(
            f"{merged} is one file: it records the adapters' hashes in its metadata, not where they are; {FIX}"
        )
    record = merged / PROVENANCE_NAME
    if not record.is_file():
        raise LorafuseError(f"{merged} has no {PROVENANCE_NAME} (lorafuse merge writes one): {FIX}")
    data = read_json(record)
    if data is None:
        raise LorafuseError(f"{record} is not a JSON object: {FIX}")
    sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    adapters = _field(data, "adapters", list, record)
    if not adapters or not all(isinstance(a, dict) for a in adapters):
        raise LorafuseError(f"{record} records no adapters: {FIX}")
    infos = sources.get("adapters") if isinstance(sources.get("adapters"), list) else []
    infos = [i if isinstance(i, dict) else {} for i in infos] + [{}] * (len(adapters) - len(infos))
    base_info = sources.get("base") if isinstance(sources.get("base"), dict) else {}
    paths = [_field(a, "path", str, record) for a in adapters]
    formats = {a.get("format") for a in adapters}
    conv1d = data.get("conv1d_modules")
    cwd = data.get("cwd") if isinstance(data.get("cwd"), str) else "."
    return RecordedMerge(
        record=record,
        base=_where(_field(data, "base", str, record), base_info, "base model", record, cwd),
        adapters=[_where(p, info, "adapter", record, cwd) for p, info in zip(paths, infos)],
        weights=[float(_field(a, "weight", (int, float), record)) for a in adapters],
        hashes=[a["files"] if isinstance(a.get("files"), dict) else {} for a in adapters],
        adapter_format=formats.pop() if len(formats) == 1 and None not in formats else None,
        allow_unmatched=data.get("allow_unmatched") is True,
        conv1d_modules=conv1d if isinstance(conv1d, str) else None,
        part_weights=_part_weights(adapters, record),
    )


def _part_weights(adapters: list[dict[str, Any]], record: Path) -> list[dict[str, float] | None] | None:
    """Each adapter's recorded per-part strengths (None for an adapter without), or None when no adapter has any."""
    found = [a.get("part_weights") for a in adapters]
    if not any(found):
        return None
    if not all(p is None or isinstance(p, dict) for p in found):
        raise LorafuseError(f"{record} has no valid 'part_weights' (it was edited or is not lorafuse's): {FIX}")
    return found


def check_hashes(recorded: RecordedMerge, local_adapters: list[Path]) -> None:
    """Refuse adapters (as fetched: ``local_adapters``) whose weight files are not the ones merged."""
    for label, path, hashes in zip(recorded.adapters, local_adapters, recorded.hashes):
        for name, digest in hashes.items():
            file = path if path.is_file() and path.name == name else path / name
            if not file.is_file():
                raise LorafuseError(f"adapter {label} has no {name} any more ({recorded.record} records it): {FIX}")
            if sha256_file(file) != digest:
                raise LorafuseError(
                    f"adapter {label} changed since the merge: the sha256 of {name} is not the one {recorded.record} "
                    f"records; {FIX}"
                )
