"""Checks shared by the hostile-input tests: one-line errors, inputs unchanged, no litter.

Every bad input must end in a non-zero exit, one line naming the file or value, inputs byte for byte unchanged
and nothing left beside the output. These helpers make each test say that in one call.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# One entry point per console script, run as a child process so that tracebacks and exit codes are real.
ENTRY_POINTS = {
    "lorafuse": "from lorafuse.cli import main",
    "merge-adapter": "from lorafuse.cli.compat import merge_adapter_main as main",
    "lora-extractor": "from lorafuse.cli.compat import extractor_main as main",
    "lora-merger": "from lorafuse.cli.compat import merger_main as main",
}


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_command(command: str, *args: str | os.PathLike, cwd: Path | None = None, env: dict | None = None) -> Result:
    """Run one of lorafuse's console scripts in a child process (no stdin), returning exit code and output."""
    script = f"import sys; {ENTRY_POINTS[command]}; sys.exit(main(sys.argv[1:]))"
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as links, never followed) -> a digest of its content or target."""
    root = Path(root)
    found: dict[str, str] = {}
    paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
    for path in paths:
        rel = str(path.relative_to(root)) if path != root else "."
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            found[rel] = "dir"
    return found


def snapshot(*roots: Path) -> dict[str, dict[str, str]]:
    """Digests of several input trees, to compare after the command ran."""
    return {str(r): tree_digest(r) for r in roots}


def assert_refused(result: Result, *needles: str, code: int | None = None) -> str:
    """Non-zero exit, no traceback, and a last stderr line that holds every ``needle``; returns that line."""
    assert result.code != 0, f"exit 0 for a bad input; stdout={result.out!r} stderr={result.err!r}"
    if code is not None:
        assert result.code == code, result.err
    assert "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines, "no error message"
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    assert len(errors) == 1, f"expected one error line, got: {result.err!r}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def assert_no_litter(parent: Path, allowed: set[str] | None = None) -> None:
    """Nothing in ``parent`` but ``allowed`` names: no hidden temporaries, no half outputs."""
    names = {p.name for p in Path(parent).iterdir()}
    extra = names - (allowed or set())
    assert not extra, f"left behind in {parent}: {sorted(extra)}"
