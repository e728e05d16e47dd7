"""What a merge did: the report ``lorafuse.merge`` returns and ``lorafuse_merge.json`` holds (no torch here)."""

from __future__ import annotations

import hashlib
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
