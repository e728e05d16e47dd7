"""One merge split across workers: the plan is made once on the driver, each output shard is written by one task.

The driver lays out the shards exactly as a single-process merge does (the safetensors writer's layout and
headers, writers/safetensors.py), then hands each task its shard: the plan cut down to that shard's tensors, pickled
once with every checkpoint reduced to its file list (a task reopens the files at the same absolute paths and checks
that their headers are the ones the plan was made from). A task reads only its tensors' base bytes and adapter
factors, writes its shard file into the output's temporary folder, and reports the file's size and sha256. Once
every shard is back and its size and header bytes check out on the driver, the driver writes the index and the
rest of the folder, and the atomic rename publishes it (merger.py). The bytes are those of the single-process
merge: the same slots, the same header, the same kernel per tensor.

Every path (base, adapters, output) must be the same on every worker: a shared filesystem mounted at the same
place on each node (NFS, Lustre, CephFS, GPFS, a FUSE mount of an object store). Nothing is uploaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..cpus import usable_cpus
from ..errors import InputError, LorafuseError, OutputError
from ..io.checkpoint import Checkpoint
from ..io.layout import Slot, safetensors_header
from ..plan import MergePlan
from .executors import Executor, failed_message, make_executor
from .jobs import CPUS_VAR

LOCK_TYPE = type(threading.Lock())
HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class ShardTask:
    """What one task writes: shard ``index`` of the layout, as ``name`` in ``folder``, from the pickled sub-plan."""

    index: int
    name: str
    folder: str
    plan: bytes
    slots: list[Slot]
    size: int  # the file's expected size: header + tensor bytes
    cpus: int = 1  # the CPUs its kernel may use (tasks side by side share a machine)


@dataclass(frozen=True)
class ShardResult:
    """What a task reports about the shard it wrote."""

    index: int
    size: int
    sha256: str
    nonfinite: list[str]
    seconds: float
    host: str


def _reopen(files: list[str], infos: dict[str, Any]) -> Checkpoint:
    """A checkpoint opened again on a worker; refused when its headers are not the ones the driver planned with."""
    checkpoint = Checkpoint([Path(f) for f in files])
    if checkpoint.infos != infos:
        changed = next((n for n in infos if checkpoint.infos.get(n) != infos[n]), None) or "a tensor"
        where = infos[changed].path if changed in infos else files[0]
        checkpoint.close()
        raise InputError(
            f"{where} on {socket.gethostname()} does not hold the tensors the plan was made from ({changed!r}): "
            "every worker must see the same files at the same path (a shared filesystem)"
        )
    return checkpoint


class _PlanPickler(pickle.Pickler):
    """Pickles a plan for another process: checkpoints as their absolute file lists (descriptors are per-process),
    locks as new locks."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is Checkpoint:
            infos = {n: replace(i, path=Path(i.path).absolute()) for n, i in obj.infos.items()}
            return _reopen, ([str(Path(f).absolute()) for f in obj.files], infos)
        if isinstance(obj, Checkpoint):
            raise LorafuseError(
                f"a shard-parallel merge reads safetensors or .bin checkpoints, not a {type(obj).__name__}: "
                "merge without --workers/--executor ray"
            )
        if isinstance(obj, LOCK_TYPE):
            return threading.Lock, ()
        return NotImplemented


def pickle_plan(plan: MergePlan) -> bytes:
    buffer = io.BytesIO()
    _PlanPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(plan)
    return buffer.getvalue()


def shard_plan(plan: MergePlan, names: set[str]) -> MergePlan:
    """The plan of one shard: its output tensors, and the untouched tensors among them to scan for NaN/Inf."""
    tensors = [t for t in plan.tensors if t.name in names]
    sources = {t.source for t in tensors}
    return replace(plan, tensors=tensors, scan=[n for n in plan.scan if n in sources])


def _close_plan(plan: MergePlan) -> None:
    plan.base.close()
    for tensor in plan.tensors:
        for placed in tensor.edits:
            for ref in placed.edit.refs():
                ref.checkpoint.close()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_shard(task: ShardTask) -> ShardResult:
    """Run on a worker: write one shard file with the kernel, then report its size and sha256."""
    from ..engine import kernel
    from ..writers.safetensors import SafetensorsShardSink

    if CPUS_VAR not in os.environ:
        os.environ[CPUS_VAR] = str(task.cpus)
    started = time.perf_counter()
    folder = Path(task.folder)
    if not folder.is_dir():
        raise OutputError(
            f"the output's temporary folder {folder} is not visible on {socket.gethostname()}: the output must be "
            "on a filesystem every worker mounts at the same path"
        )
    plan: MergePlan = pickle.loads(task.plan)
    slots = [replace(s, shard=0) for s in task.slots]  # this task's file is its sink's only one
    try:
        sink = SafetensorsShardSink(folder, [slots], [task.name])
        try:
            nonfinite = kernel.run(plan, sink, {s.name: s for s in slots})
        finally:
            sink.close()
    finally:
        _close_plan(plan)
    path = folder / task.name
    return ShardResult(
        task.index,
        path.stat().st_size,
        file_sha256(path),
        nonfinite,
        time.perf_counter() - started,
        socket.gethostname(),
    )


@dataclass
class ShardRun:
    """How to split a merge's writing: the executor's name, its cluster address, the most tasks at once, retries."""

    executor: str = "ray"
    workers: int | None = None
    address: str | None = None
    retries: int = 1

    def make(self) -> Executor:
        return make_executor(self.executor, self.workers, self.address)


@dataclass
class ShardedOutput:
    """The shard files written, their index, and what the tasks found."""

    files: list[str]
    sha256: dict[str, str]
    nonfinite: list[str]


def check_shard(folder: Path, task: ShardTask, result: ShardResult, header: bytes) -> None:
    """The driver's check of a reported shard: the size reported, the size on disk and the header bytes on disk are
    the layout's."""
    path = folder / task.name
    size = path.stat().st_size if path.is_file() else -1
    if result.size != task.size or size != task.size:
        raise OutputError(
            f"shard {path} is {size} bytes on the driver ({result.size} reported by {result.host}), not {task.size}: "
            "the output is not on a filesystem every worker shares, or it changed; nothing was published"
        )
    with open(path, "rb") as handle:
        if handle.read(len(header)) != header:
            raise OutputError(f"shard {path} does not start with the header laid out for it: nothing was published")


def write_sharded(
    plan: MergePlan,
    folder: Path,
    prefix: str,
    max_shard_size: int,
    run: ShardRun,
    progress: Callable[[int], None] | None = None,
) -> ShardedOutput:
    """Write the plan's safetensors shards into ``folder`` (the atomic output's temporary), one task per shard on
    ``run``'s executor, then the index; every shard checked before the index is written."""
    from ..merger import output_slots
    from ..writers import get_writer

    writer = get_writer("safetensors")
    layout = writer.layout(output_slots(plan), prefix, max_shard_size)
    headers = [safetensors_header(shard) for shard in layout.shards]  # sets each slot's offset, as the sink does
    executor = run.make()
    cpus = 1 if run.executor == "ray" else max(1, usable_cpus() // min(len(headers), executor.workers))
    tasks = [
        ShardTask(
            i,
            name,
            str(Path(folder).absolute()),
            pickle_plan(shard_plan(plan, {s.name for s in shard})),
            shard,
            len(header) + sum(s.nbytes for s in shard),
            cpus,
        )
        for i, (name, shard, header) in enumerate(zip(layout.names, layout.shards, headers))
    ]

    def finished(index: int, outcome: Any) -> None:
        if outcome.ok and progress is not None:
            progress(sum(s.nbytes for s in tasks[index].slots))

    outcomes = executor.run(write_shard, tasks, run.retries, [t.name for t in tasks], on_end=finished)
    failures = [(t, o) for t, o in zip(tasks, outcomes) if not o.ok]
    if failures:
        task, outcome = failures[0]
        raise LorafuseError(f"shard {task.name}: {failed_message(outcome)}; nothing was published")
    results: list[ShardResult] = [o.value for o in outcomes]
    for task, result, header in zip(tasks, results, headers):
        check_shard(Path(folder), task, result, header)
    writer.finish(Path(folder), layout)
    return ShardedOutput(
        layout.files,
        {t.name: r.sha256 for t, r in zip(tasks, results)},
        [name for r in results for name in r.nonfinite],
    )


def available_check(run: ShardRun | None, out_format: str, single_file: bool, device: str, pipeline: bool) -> None:
    """Refuse a shard-parallel merge of an output it cannot split (one line, with the fix)."""
    if run is None:
        return
    refused = {
        "a GGUF or .bin output": out_format != "safetensors",
        "a single-file output": single_file,
        "a diffusers pipeline": pipeline,
        f"--device {device}": device != "cpu",
    }
    why = next((what for what, applies in refused.items() if applies), None)
    if why is not None:
        raise LorafuseError(
            f"a shard-parallel merge (--workers/--executor ray) writes a sharded safetensors folder on the CPU, not "
            f"{why}: merge without --workers/--executor ray"
        )


__all__ = ["ShardRun", "ShardedOutput", "available_check", "write_shard", "write_sharded"]
