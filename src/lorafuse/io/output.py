"""Atomic output: write into a hidden temporary sibling, then rename into place.

An interrupted merge leaves only the hidden temporary (removed on the next error path), never a folder that
looks complete. An existing non-empty output is replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import OutputError


def _is_empty(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output(output: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse outputs that would destroy a user's data or an input."""
    output = output.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if output == inp or inp.is_relative_to(output):
            raise OutputError(f"output {output} would overwrite the input {inp}: choose another output path")
    if output.exists() and not overwrite and not _is_empty(output):
        kind = "folder" if output.is_dir() else "file"
        raise OutputError(f"output {kind} {output} exists and is not empty: choose a new path or pass --overwrite")


class AtomicOutput:
    """A temporary sibling of ``final`` that becomes ``final`` on :meth:`commit`."""

    def __init__(self, final: Path, is_dir: bool = True, adopt: bool = False):
        """``adopt``: keep a temporary folder this process already started (the CLI's prefill, prefill.py)."""
        self.final = Path(final).absolute()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.is_dir = is_dir
        self.tmp = self.final.parent / f".{self.final.name}.lorafuse-tmp-{os.getpid()}"
        if adopt and is_dir and self.tmp.is_dir() and not self.tmp.is_symlink():
            return
        self.remove(self.tmp)
        if is_dir:
            self.tmp.mkdir()

    @staticmethod
    def remove(path: Path) -> None:
        """Remove a file or folder tree (a symlink itself, never its target)."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def commit(self) -> Path:
        """Move the finished output into place, replacing what --overwrite allowed us to replace."""
        old = None
        if self.final.exists() or self.final.is_symlink():
            old = self.final.parent / f".{self.final.name}.lorafuse-old-{os.getpid()}"
            self.remove(old)
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            self.remove(old)
        return self.final

    def abort(self) -> None:
        self.remove(self.tmp)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
