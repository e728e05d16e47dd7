"""Where batch jobs and merge shards run: ``local`` (one process per attempt, at most N at once on this machine) or
``ray`` (one Ray task per attempt on a cluster). Both retry a failed attempt up to ``retries`` times and tell a
failure of the work (a one-line error) from the death of the process that ran it.

An attempt runs in a process of its own: a worker killed by the OOM killer or a signal fails that attempt only,
never the others (a ``concurrent.futures`` process pool breaks as a whole when one worker dies). Local processes
start from a fork server that has imported only lorafuse's light modules (numpy loads in each attempt after its
thread pools are sized, cpus.py); each attempt is told the share of the CPUs it may use (``LORAFUSE_CPUS``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import LorafuseError

POLL_SECONDS = 0.2


@dataclass
class Outcome:
    """How one item ended: ``value`` when ``ok``; the error of each failed attempt in ``errors``."""

    ok: bool = False
    value: Any = None
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def attempts(self) -> int:
        return len(self.errors) + (1 if self.ok else 0)


def failed_message(outcome: Outcome) -> str:
    """One line for an item that failed every attempt."""
    tries = f" (after {outcome.attempts} attempts)" if outcome.attempts > 1 else ""
    return f"{outcome.errors[-1] if outcome.errors else 'failed'}{tries}"


def error_line(exc: BaseException) -> str:
    """An exception as one line: a LorafuseError's own message, else its type and message."""
    text = str(exc) if isinstance(exc, LorafuseError) else f"{type(exc).__name__}: {exc}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


Hook = Callable[[int, Any], None]


class Executor(Protocol):
    """Runs ``fn(item)`` for every item (at most ``workers`` at once), each failed attempt retried up to
    ``retries`` times; ``on_start(i, attempt)`` and ``on_end(i, outcome)`` are called on the caller's thread."""

    workers: int | None  # None: as many at once as the cluster schedules

    def run(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        retries: int,
        labels: Sequence[str],
        on_start: Hook | None = None,
        on_end: Hook | None = None,
    ) -> list[Outcome]: ...


def _record(
    outcomes: list[Outcome],
    queue: list[int],
    index: int,
    started: float,
    message: tuple[str, Any],
    retries: int,
    on_end: Hook | None,
) -> None:
    """Count an attempt of item ``index`` that ended with ``message`` (``("ok", value)`` or ``("error", line)``):
    a failure with retries left goes back to the head of ``queue`` (retried next, before items not yet started),
    anything else is the item's end."""
    outcome = outcomes[index]
    outcome.seconds += time.perf_counter() - started
    if message[0] == "ok":
        outcome.ok, outcome.value = True, message[1]
    else:
        outcome.errors.append(message[1])
        if len(outcome.errors) <= retries:
            queue.insert(0, index)
            return
    if on_end is not None:
        on_end(index, outcome)


def _child(conn: multiprocessing.connection.Connection, fn: Callable[[Any], Any], item: Any) -> None:
    """An attempt in its own process: the result, or the error as one line, sent back through ``conn``."""
    try:
        message: tuple[str, Any] = ("ok", fn(item))
    except BaseException as exc:  # noqa: BLE001 (everything the attempt raised is reported, never a traceback)
        message = ("error", error_line(exc))
    conn.send(message)
    conn.close()


@dataclass
class _Running:
    index: int
    process: Any
    conn: multiprocessing.connection.Connection
    started: float


class LocalExecutor:
    """At most ``workers`` processes at once on this machine, one per attempt, from a fork server."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["lorafuse.batch.jobs"])  # light: numpy loads in each attempt

    def run(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        retries: int,
        labels: Sequence[str],
        on_start: Hook | None = None,
        on_end: Hook | None = None,
    ) -> list[Outcome]:
        outcomes = [Outcome() for _ in items]
        queue = list(range(len(items)))
        running: list[_Running] = []
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    index = queue.pop(0)
                    receive, send = self.context.Pipe(duplex=False)
                    process = self.context.Process(
                        target=_child, args=(send, fn, items[index]), name=f"lorafuse-{labels[index]}", daemon=True
                    )
                    process.start()
                    send.close()
                    running.append(_Running(index, process, receive, time.perf_counter()))
                    if on_start is not None:
                        on_start(index, outcomes[index].attempts + 1)
                ready = multiprocessing.connection.wait(
                    [r.conn for r in running] + [r.process.sentinel for r in running], POLL_SECONDS
                )
                for run in [r for r in running if r.conn in ready or r.process.sentinel in ready]:
                    message = self._result(run)
                    if message is None:
                        continue
                    running.remove(run)
                    _record(outcomes, queue, run.index, run.started, message, retries, on_end)
        finally:
            for run in running:  # interrupted: no attempt outlives the batch
                run.process.kill()
                run.process.join()
        return outcomes

    @staticmethod
    def _result(run: _Running) -> tuple[str, Any] | None:
        """The attempt's message once it sent one or died; None while it still runs."""
        try:
            if run.conn.poll():
                message = run.conn.recv()
                run.process.join()
                run.conn.close()
                return message
        except (EOFError, OSError):
            pass  # the process died with the pipe open
        if run.process.is_alive() and run.process.exitcode is None:
            return None
        run.process.join()
        run.conn.close()
        return ("error", f"the worker process died (exit code {run.process.exitcode})")


class RayExecutor:
    """One Ray task per attempt on the cluster at ``address`` (None: Ray's default, RAY_ADDRESS or a local one);
    Ray's own task retries are off so that every attempt is counted and reported here."""

    def __init__(self, workers: int | None, address: str | None = None, cpus_per_task: float = 1):
        self.ray = require_ray()
        if not self.ray.is_initialized():
            self.ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.workers = workers
        self.cpus = cpus_per_task

    def run(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        retries: int,
        labels: Sequence[str],
        on_start: Hook | None = None,
        on_end: Hook | None = None,
    ) -> list[Outcome]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.cpus, max_retries=0)(fn)
        outcomes = [Outcome() for _ in items]
        queue = list(range(len(items)))
        running: dict[Any, tuple[int, float]] = {}
        limit = self.workers or len(items)
        try:
            while queue or running:
                while queue and len(running) < limit:
                    index = queue.pop(0)
                    ref = remote.options(name=f"lorafuse-{labels[index]}").remote(items[index])
                    running[ref] = (index, time.perf_counter())
                    if on_start is not None:
                        on_start(index, outcomes[index].attempts + 1)
                done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                for ref in done:
                    index, started = running.pop(ref)
                    try:
                        message: tuple[str, Any] = ("ok", ray.get(ref))
                    except ray.exceptions.RayTaskError as exc:
                        message = ("error", error_line(exc.cause) if exc.cause is not None else error_line(exc))
                    except ray.exceptions.RayError as exc:  # the worker or its node died, the task was lost
                        message = ("error", f"the Ray worker died ({type(exc).__name__})")
                    _record(outcomes, queue, index, started, message, retries, on_end)
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
        return outcomes


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise LorafuseError(
            "--executor ray needs Ray: pip install 'lorafuse[ray]' (or pip install ray), or use --executor local"
        ) from None
    return ray


EXECUTORS = ("local", "ray")


def make_executor(name: str, workers: int | None, address: str | None = None) -> Executor:
    """The executor ``name``: ``local`` runs ``workers`` processes at once (default: the CPUs this process may use),
    ``ray`` connects to the cluster at ``address``."""
    if name == "local":
        if address is not None:
            raise LorafuseError("--address names a Ray cluster: give it with --executor ray")
        from ..cpus import usable_cpus

        return LocalExecutor(workers or usable_cpus())
    if name == "ray":
        return RayExecutor(workers, address)
    raise LorafuseError(f"unknown executor {name!r}: use {' or '.join(EXECUTORS)}")
