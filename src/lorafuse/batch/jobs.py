"""One batch job on a worker: the command run as ``lorafuse COMMAND ARGS --json -q`` would run it (cli.main), in
the manifest's folder, its JSON report captured. Light to import (no numpy): the local executor's fork server
preloads it, and numpy must load only after the job's thread pools are sized (cpus.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from typing import Any

from ..errors import LorafuseError

CPUS_VAR = "LORAFUSE_CPUS"  # cpus.fixed_cpus: the CPUs each job's thread pools are sized to


class JobFailed(LorafuseError):
    """The command exited with an error (its one line is the message)."""


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` (``command``, ``argv``, ``cwd``, ``cpus``) and return its result: the command's JSON report,
    the host and process that ran it, seconds; raises :class:`JobFailed` with the command's error line."""
    from ..cli import main

    if job.get("cpus") and CPUS_VAR not in os.environ:
        os.environ[CPUS_VAR] = str(job["cpus"])  # jobs side by side share the machine instead of each taking it all
    started = time.perf_counter()
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(job["cwd"])  # the manifest's relative paths, and the cwd the provenance records, as on the command line
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([job["command"], "--json", "-q", *job["argv"]])  # before the argv's "--"
    finally:
        os.chdir(here)
    if code != 0:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("lorafuse: ")), lines[-1] if lines else "")
        message = said.removeprefix("lorafuse: ").removeprefix("error: ") or f"exit code {code}"
        raise JobFailed(message)
    try:
        report = json.loads(out.getvalue())
    except json.JSONDecodeError:
        report = None
    return {
        "report": report,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seconds": time.perf_counter() - started,
    }
