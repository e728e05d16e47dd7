"""Whether a job of a re-run is already done: the previous run's report says it succeeded with the same arguments
and inputs, its output is still what that run left, and (a merge) the output's own provenance matches.

- ``fingerprint``: sha256 of the command, its arguments, the lorafuse version, and every local input's files by
  (name, size, mtime) — hashing a 1 TB base on every re-run would cost as much as merging it again.
- ``output_state``: the output's files by (name, size, mtime), as the previous run recorded them after the job.
- a merge's ``lorafuse_merge.json``: each adapter file's sha256, recomputed now (adapters are small), and the
  weights, as recorded there.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..report import PROVENANCE_NAME, sha256_file
from .manifest import Job

SKIPPED_DIRS = {".git"}


def file_states(path: Path) -> list[list[Any]]:
    """(relative name, size, mtime_ns) of ``path`` (a file) or of every file under it (a folder), sorted."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    found: list[list[Any]] = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in sorted(files):
            entry = Path(folder) / name
            st = entry.stat()
            found.append([str(entry.relative_to(path)), st.st_size, st.st_mtime_ns])
    return found


def _local(job: Job, value: str) -> Path | None:
    path = Path(job.cwd) / value
    return path if path.exists() else None


def fingerprint(job: Job) -> str:
    """What the job computes from: command, arguments, version, and the local inputs' file states."""
    inputs = {value: file_states(p) for value in job.inputs if (p := _local(job, value)) is not None}
    body = {"version": __version__, "command": job.command, "argv": list(job.argv), "inputs": inputs}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def output_state(job: Job) -> list[list[Any]] | None:
    """The job's output as it is now; None when it has no output or the output is absent."""
    if job.output is None:
        return None
    path = Path(job.cwd) / job.output
    return file_states(path) if path.exists() else None


def _merge_provenance_matches(job: Job, result: dict[str, Any]) -> bool:
    """The output's ``lorafuse_merge.json`` records the adapters' current sha256s and the weights run."""
    if job.command != "merge" or job.output is None:
        return True
    record_path = Path(job.cwd) / job.output / PROVENANCE_NAME
    if not record_path.is_file():
        return (Path(job.cwd) / job.output).is_file()  # a single-file output keeps it in its metadata
    try:
        record = json.loads(record_path.read_text())
        reported = (result.get("report") or {}).get("adapters") or []
        if [a["weight"] for a in record["adapters"]] != [a["weight"] for a in reported]:
            return False
        for adapter in record["adapters"]:
            where = Path(record.get("cwd") or job.cwd) / adapter["path"]
            for name, digest in adapter["files"].items():
                file = where / name if where.is_dir() else where
                if not file.is_file() or sha256_file(file) != digest:
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def already_done(job: Job, previous: dict[str, Any] | None) -> bool:
    """True when ``previous`` (the job's entry in the last report) shows this very job done and its output intact."""
    if not previous or previous.get("status") not in ("ok", "skipped"):
        return False
    if previous.get("fingerprint") != fingerprint(job):
        return False
    if job.output is not None and previous.get("output_state") != output_state(job):
        return False
    return _merge_provenance_matches(job, previous.get("result") or {})
