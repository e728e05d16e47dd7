"""What a merged model records about how it was made: ``lorafuse_merge.json`` in an output folder, and one
``__metadata__`` key in a single safetensors file (which has no folder to hold that file)."""

from __future__ import annotations

import json
from pathlib import Path

from ..report import PROVENANCE_NAME, MergeReport

METADATA_KEY = "lorafuse_merge"  # the single-file output's provenance, beside the base file's own metadata


def write_provenance(folder: Path, report: MergeReport) -> None:
    """The whole report as ``lorafuse_merge.json`` in ``folder``."""
    (folder / PROVENANCE_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def provenance_metadata(base_metadata: dict[str, str], report: MergeReport) -> dict[str, str]:
    """A single file's ``__metadata__``: the base file's, plus what was merged in (no paths or timings, so the same
    inputs give the same bytes wherever and however the merge ran)."""
    merged = {
        "lorafuse_version": report.lorafuse_version,
        "dtype": report.dtype,
        "adapters": [
            {"weight": a["weight"], "format": a["format"], "files": a["files"]}
            | ({"part_weights": a["part_weights"]} if "part_weights" in a else {})
            for a in report.adapters
        ],
    }
    return {**base_metadata, METADATA_KEY: json.dumps(merged, separators=(",", ":"), sort_keys=True)}
