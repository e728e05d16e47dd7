"""``lorafuse batch``: run a manifest's jobs on an executor, skip the ones a previous run finished, report each.

Jobs that read the same base are ordered side by side, so that they run at the same time or one after the other
while the base is in the page cache: each job still reads it (jobs are separate processes, each one's failure
its own), but from memory instead of the disk, for a base that fits in RAM. Each job's output is atomic
(io/output.py): a job that fails or whose worker dies leaves nothing at its output, and its retry starts clean.
The JSON report (by default beside the manifest) is what the next run resumes from.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io.output import remove_stale_temporaries
from ..report import text_table
from .executors import Executor, Outcome, failed_message, make_executor
from .jobs import run_job
from .manifest import Job, load_manifest
from .resume import already_done, fingerprint, output_state

REPORT_SUFFIX = ".report.json"


@dataclass
class JobEntry:
    """One job's line of the report."""

    id: str
    command: str
    status: str  # ok, failed, skipped (done by a previous run)
    output: str | None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fingerprint: str = ""
    output_state: list[list[Any]] | None = None
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchReport:
    """What a batch run did: every job's entry, in manifest order."""

    manifest: str
    executor: str
    jobs: list[JobEntry]
    seconds: float = 0.0

    @property
    def failed(self) -> list[JobEntry]:
        return [j for j in self.jobs if j.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_report_path(manifest: Path) -> Path:
    return manifest.with_name(manifest.stem + REPORT_SUFFIX)


def _previous(path: Path) -> dict[str, dict[str, Any]]:
    """The job entries of the last report at ``path`` by id (none when it is absent or unreadable)."""
    try:
        return {j["id"]: j for j in json.loads(path.read_text())["jobs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def by_base(jobs: list[Job]) -> list[Job]:
    """The jobs with those of one base side by side, in the order each base first appears."""
    first = {}
    for n, job in enumerate(jobs):
        first.setdefault(job.base, n)
    return sorted(jobs, key=lambda job: first[job.base])


def _own_output(job: Job, before: dict[str, Any] | None) -> bool:
    """True when the job's output is exactly what this batch's previous run wrote there: a re-run of the job (its
    inputs or options changed) may replace it. Anything else at the output is refused, as on the command line."""
    state = output_state(job)
    return (
        bool(before)
        and before.get("status") in ("ok", "skipped")
        and state is not None
        and (state == before.get("output_state"))
    )


def _absolute(job: Job, value: str) -> str:
    return os.path.normpath(Path(job.cwd) / value)


def needs(job: Job, jobs: list[Job]) -> list[Job]:
    """The jobs whose output is one of ``job``'s inputs (a verify of a merge of the same manifest)."""
    inputs = {_absolute(job, value) for value in job.inputs}
    return [other for other in jobs if other.output is not None and _absolute(other, other.output) in inputs]


def waves(jobs: list[Job]) -> list[list[int]]:
    """The jobs (by index) in rounds: each round only needs outputs of earlier rounds. A job that needs its own
    output, or a cycle, runs in the last round (and fails there on its missing input, as on the command line)."""
    placed: dict[int, int] = {}
    rounds: list[list[int]] = []
    pending = list(range(len(jobs)))
    while pending:
        wave = [n for n in pending if all(jobs.index(d) in placed for d in needs(jobs[n], jobs) if d is not jobs[n])]
        wave = wave or pending  # a cycle: run what is left
        for n in wave:
            placed[n] = len(rounds)
        rounds.append(wave)
        pending = [n for n in pending if n not in placed]
    return rounds


class JobLines:
    """One line per running job on a terminal (tqdm keeps them apart): its id, command, attempt and time."""

    def __init__(self, show: bool | None):
        self.show = sys.stderr.isatty() if show is None else show
        self.bars: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        if self.show:  # the elapsed times move between the jobs' starts and ends
            threading.Thread(target=self._refresh, name="lorafuse-job-lines", daemon=True).start()

    def _refresh(self) -> None:
        while not self.done.wait(1.0):
            with self.lock:
                for bar in self.bars.values():
                    bar.refresh()

    def start(self, job: Job, attempt: int) -> None:
        if not self.show:
            return
        from tqdm import tqdm

        self.stop(job.id)
        again = f", attempt {attempt}" if attempt > 1 else ""
        with self.lock:
            self.bars[job.id] = tqdm(
                total=None, desc=f"{job.id} ({job.command}{again})", bar_format="{desc}: running {elapsed}", leave=False
            )

    def stop(self, job_id: str) -> None:
        with self.lock:
            bar = self.bars.pop(job_id, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        self.done.set()
        for job_id in list(self.bars):
            self.stop(job_id)


def write_report(report: BatchReport, path: Path) -> None:
    """The JSON report, replaced atomically (a run killed while writing it leaves the previous one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def run_batch(
    manifest: str | Path,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    retries: int = 1,
    report_path: str | Path | None = None,
    rerun: bool = False,
    show_progress: bool | None = None,
) -> BatchReport:
    """Run the jobs of ``manifest`` (manifest.py) on ``executor`` (``local``: ``workers`` processes at once, default
    the usable CPUs; ``ray``: the cluster at ``address``), each failed job retried ``retries`` times; jobs a previous
    run finished (its report at ``report_path``) are skipped unless ``rerun``. Writes the JSON report."""
    started = time.perf_counter()
    manifest = Path(manifest)
    jobs = load_manifest(manifest)
    report_file = Path(report_path) if report_path is not None else default_report_path(manifest)
    previous = {} if rerun else _previous(report_file)
    entries, todo = _done_before(jobs, previous)
    try:
        if todo:
            pool = make_executor(executor, workers, address)
            share = 1 if executor == "ray" else max(1, _usable() // min(len(todo), pool.workers or 1))
            _run_waves(todo, pool, retries, share, previous, entries, JobLines(show_progress))
    finally:  # interrupted too: what finished is recorded, so that the next run resumes from it
        seconds = round(time.perf_counter() - started, 3)
        report = BatchReport(str(manifest), executor, [entries.get(j.id) or _not_run(j) for j in jobs], seconds)
        write_report(report, report_file)
    return report


def _not_run(job: Job, why: str = "not run: the batch was interrupted") -> JobEntry:
    return JobEntry(job.id, job.command, "failed", job.output, errors=[why])


def _done_before(jobs: list[Job], previous: dict[str, dict[str, Any]]) -> tuple[dict[str, JobEntry], list[Job]]:
    """The entries of the jobs a previous run finished, and the jobs to run (by base): those not finished, and
    those that read the output of a job that runs again."""
    entries: dict[str, JobEntry] = {}
    for job in jobs:
        before = previous.get(job.id)
        if before is not None and already_done(job, before):
            entries[job.id] = JobEntry(
                job.id, job.command, "skipped", job.output, 0, [], 0.0, before["fingerprint"],
                before.get("output_state"), before.get("result") or {},
            )  # fmt: skip
    again = True
    while again:
        again = False
        for job in jobs:
            if job.id in entries and any(d.id not in entries for d in needs(job, jobs)):
                del entries[job.id]
                again = True
    return entries, by_base([job for job in jobs if job.id not in entries])


def _run_waves(
    todo: list[Job],
    pool: Executor,
    retries: int,
    share: int,
    previous: dict[str, dict[str, Any]],
    entries: dict[str, JobEntry],
    lines: JobLines,
) -> None:
    """Run ``todo`` wave by wave (waves()), each job's entry put in ``entries`` as it ends. A job whose output is
    what this batch wrote there before runs with ``--overwrite``; ``share``: the CPUs each job sizes its pools to."""
    replace = {job.id for job in todo if _own_output(job, previous.get(job.id))}
    prints: dict[str, str] = {}

    def ended(job: Job, outcome: Outcome) -> None:
        lines.stop(job.id)
        if outcome.attempts > 1 and job.output is not None:
            # A killed attempt's temporary is removed by the next attempt only once its process is gone; a Ray
            # worker may still be exiting then. Every attempt has ended now: remove what dead ones left.
            remove_stale_temporaries(Path(job.cwd) / job.output)
        entries[job.id] = JobEntry(
            job.id,
            job.command,
            "ok" if outcome.ok else "failed",
            job.output,
            outcome.attempts,
            outcome.errors,
            round(outcome.seconds, 3),
            prints[job.id],
            output_state(job) if outcome.ok else None,
            outcome.value or {},
        )

    try:
        for wave in waves(todo):
            ready: list[Job] = []
            for job in (todo[n] for n in wave):
                prints[job.id] = fingerprint(job)  # after the earlier waves wrote its inputs
                failed = [d.id for d in needs(job, todo) if d.id in entries and entries[d.id].status != "ok"]
                if failed:
                    entries[job.id] = _not_run(job, f"not run: job {failed[0]}, which writes its input, failed")
                    entries[job.id].fingerprint = prints[job.id]
                else:
                    ready.append(job)
            items = [
                {
                    "command": job.command,
                    "argv": (["--overwrite"] if job.id in replace else []) + list(job.argv),
                    "cwd": job.cwd,
                    "cpus": share,
                }
                for job in ready
            ]
            pool.run(
                run_job,
                items,
                retries,
                [job.id for job in ready],
                lambda i, attempt, ready=ready: lines.start(ready[i], attempt),
                lambda i, outcome, ready=ready: ended(ready[i], outcome),
            )
    finally:
        lines.close()


def _usable() -> int:
    from ..cpus import usable_cpus

    return usable_cpus()


def render_batch(report: BatchReport) -> list[str]:
    """The summary table: one row per job."""
    rows = [
        [
            j.id,
            j.command,
            j.status,
            str(j.attempts),
            f"{j.seconds:.1f}s",
            failed_message(Outcome(False, None, j.errors, 0.0)) if j.status == "failed" else (j.output or ""),
        ]
        for j in report.jobs
    ]
    lines = text_table(rows, ["job", "command", "status", "tries", "time", "output / error"])
    counts = {s: sum(j.status == s for j in report.jobs) for s in ("ok", "skipped", "failed")}
    lines.append(
        f"{counts['ok']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed "
        f"in {report.seconds:.1f}s ({report.executor})"
    )
    return lines
