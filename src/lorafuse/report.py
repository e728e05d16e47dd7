"""What a merge did: the report ``lorafuse.merge`` returns and ``lorafuse_merge.json`` holds, and the one size
formatter every command prints sizes with (no numpy or torch here: the CLI imports it before either loads)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__

PROVENANCE_NAME = "lorafuse_merge.json"


@dataclass
class MergeReport:
    """What a merge did (or, with ``dry_run``, would do)."""

    base: str
    adapters: list[dict[str, Any]]
    output: str
    dtype: str
    format: str
    tensors_total: int
    tensors_touched: int
    total_bytes: int
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config_updates: dict[str, Any] = field(default_factory=dict)
    copied_files: list[str] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0
    lorafuse_version: str = __version__
    sources: dict[str, Any] = field(default_factory=dict)  # where base and adapters came from (lorafuse.sources)
    engine: str = "numpy"  # the kernel that merged: "numpy" (engine/kernel.py) or "cuda" (engine/cuda.py)
    idle_adapters: list[str] = field(default_factory=list)  # adapters whose every update is all zeros
    # What each adapter changes: {"adapter", "kind" (the edit class), "tensors", "bytes" (of those tensors)}.
    changes: list[dict[str, Any]] = field(default_factory=list)
    # Recorded so that `lorafuse verify MERGED` replays the merge as it ran:
    allow_unmatched: bool = False
    conv1d_modules: str | None = None  # --conv1d-modules as given ("c_attn,c_proj" or "none"), None when not given
    cwd: str = field(default_factory=os.getcwd)  # what the relative paths above are relative to
    tokenizer_from: str | None = None  # the adapter folder whose tokenizer files replaced the base's
    shard_sha256: dict[str, str] = field(default_factory=dict)  # shard -> sha256 its task reported (--workers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units with one decimal (``181.0 KB``, ``1.2 GB``): every command's size format.

    Callers say what was counted: "tensor bytes" (the tensors' data) or "file bytes" (on disk, headers included).
    """
    for unit in ("B", "KB", "MB", "GB"):
        if unit == "B" and abs(n) < 1000:
            return f"{int(n)} B"
        if unit != "B" and abs(round(n, 1)) < 1000:  # 999.96 KB prints as 1.0 MB, not 1000.0 KB
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def text_table(rows: list[list[str]], header: list[str]) -> list[str]:
    """``rows`` under ``header`` as left-aligned columns two spaces apart (every command's tables)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return lines


def source_notes(sources: dict[str, Any]) -> list[str]:
    """The notes on which adapter was taken from a training output folder (provenance ``sources``)."""
    return [a["training_output"]["note"] for a in sources.get("adapters", []) if "training_output" in a]


def render_merge(report: MergeReport) -> list[str]:
    """The lines ``lorafuse merge`` prints for ``report``: what changed, and with ``--dry-run`` the plan as a table
    (what each adapter changes, the shards, the files copied from the base)."""
    verb = "would write" if report.dry_run else "wrote"
    where = f"{format_bytes(report.total_bytes)} tensor bytes in {len(report.files)} file(s), dtype {report.dtype}"
    where += "" if report.dry_run else f", {report.seconds:.1f} s"
    count = len(report.adapters)
    if count and len(report.idle_adapters) == count:
        lines = [
            f"{verb} {report.output}: the adapter(s) change nothing (every lora_B is all zero), so the merged model "
            f"is the base: {report.tensors_total} tensors, {where}"
        ]
    else:
        lines = [
            f"{verb} {report.output}: {report.tensors_touched} of {report.tensors_total} tensors changed by "
            f"{count} adapter(s), {where}"
        ]
        lines += [f"  {label} changes nothing (every lora_B is all zero)" for label in report.idle_adapters]
    if not report.dry_run:
        return lines
    rows = [
        [c["adapter"], c["kind"], str(c["tensors"]), format_bytes(c["bytes"])]
        for c in report.changes
        if c["adapter"] not in report.idle_adapters
    ]
    if rows:
        lines += ["", *text_table(rows, ["adapter", "kind", "tensors", "tensor bytes"])]
    lines += ["", f"files        {', '.join(report.files)}"]
    if report.copied_files:
        lines.append(f"copied       {', '.join(report.copied_files)} (from the base)")
    if report.tokenizer_from:
        lines.append(f"tokenizer    from {report.tokenizer_from}, over the base's")
    if report.files != [Path(report.output).name]:  # a folder (a single file holds its provenance inside)
        lines.append(f"written      {PROVENANCE_NAME} and README.md (the merged model's card)")
    return lines
