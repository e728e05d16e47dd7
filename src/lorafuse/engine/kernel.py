"""The numpy kernel: applies a merge plan tensor by tensor, row block by row block, into an output writer.

Every tensor that must be computed (changed by edits, converted to another dtype, dequantized) is one job: its
base rows are read with ``preadv`` into a reused buffer, decoded to fp32 (bf16 by a shift), changed by its edits
in order (edits.py), checked (NaN/Inf, the output dtype's range), rounded once to the output dtype (to nearest,
ties to even: ``arrays.round_to``) and handed to the writer at their offset. A block is about 1 MB of fp32 rows,
so it and its buffers stay in the core's L2 cache between the decode, the products and the rounding; each thread
reuses its buffers (fresh arrays per block would cost page faults every time), so memory is a few blocks per
thread whatever the tensor, and the factors of one tensor. Edits that need every row at once (a norm across rows)
get the tensor as one block. Untouched tensors that keep their dtype are copied file to file (``copy_file_range``),
or are already in place (the prefill, io/prefill.py). A writer with ``submit`` (the safetensors and GGUF sinks)
takes the rounded blocks on its writer thread while the merge threads go on, each rounding into a ring of
:data:`OUT_BUFFERS` buffers (a buffer is reused once its write is done).

Jobs run on :func:`math_threads` threads: numpy's loops and products release the GIL, and each product runs on one
BLAS thread, so the merge threads share the cores instead of a gang-scheduled BLAS pool spinning beside them.
The order of operations on each element is fixed (the tensor's edits in plan order, whatever the block size or
thread), so every entry point writes identical bytes. Untouched float tensors are scanned for NaN/Inf in the same
pool (a warning, not an error: they are copied as they are).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..arrays import F32, check_values, checked_round, decode_f32
from ..edits import Array, BiasDelta, BlockOps, Edit, FullDiff, LoraDelta
from ..errors import LorafuseError
from ..fastcast import FAST
from ..io.layout import Slot
from ..io.writer import array_bytes
from ..math_threads import math_threads
from ..plan import MergePlan, OutputTensor
from ..torch_bridge import check_device

# fp32 bytes of one row block. With numpy's conversions, 1 MB kept the block, its raw rows, the product and the
# rounded rows in L2 between the passes: an fp16 rank-32 block pipeline took 3.9 ns per element at 1 MB (also at
# 512 KB) against 4.2 ns at 4 MB and 256 KB (docs/performance.md). With the compiled conversions (fastcast.py)
# there are fewer passes and the per-block calls weigh more: alternating runs, the SDXL bench's merge threads took
# 5.5-6.7 CPU s at 4 MB against 6.4-7.3 at 1 MB, the 1.7B LLM merge 2.3 s against 2.9-3.7 (docs/performance.md).
# The bytes are the same whatever the size.
ROW_BLOCK_BYTES = (4 << 20) if FAST is not None else (1 << 20)
# A thread's buffers above this size (a whole-tensor block) are freed after the tensor, so one huge tensor does
# not pin memory for the rest of the merge.
KEEP_BUFFER_BYTES = 256 << 20
# NaN/Inf as bit patterns (sign, all-ones exponent): a negative one is at least the first value as an unsigned
# integer, a positive one at least the second as a signed one. Two max reductions per chunk, no temporaries.
NONFINITE_BITS = {
    "BF16": (2, 0xFF80, 0x7F80),
    "F16": (2, 0xFC00, 0x7C00),
    "F32": (4, 0xFF800000, 0x7F800000),
    "F64": (8, 0xFFF0000000000000, 0x7FF0000000000000),
}
SCAN_CHUNK = 1 << 20  # bytes per read, reused: stays in the CPU cache for both reductions
SCAN_GROUP_BYTES = 256 << 20  # untouched tensors per scan job: the threads share a large single-file model


class Writer(Protocol):
    """Where a kernel puts a tensor's bytes (io/writer.py). A writer may also have ``submit(slot, data, at)``,
    which returns a ``threading.Event`` set once ``data`` is written by its writer thread (or None when written
    already), and ``flush()``, which waits for all of them and raises a failed one (writers/safetensors.py)."""

    def holds(self, slot: Slot, path: Path, offset: int) -> bool: ...
    def write(self, slot: Slot, data: memoryview, at: int = 0) -> None: ...
    def copy(self, slot: Slot, src_fd: int, src_offset: int) -> None: ...


# (byte offset in the tensor, bytes) -> None when the bytes are written, or an event set once they are (the
# buffer is not reused before).
Emit = Callable[[int, memoryview], "threading.Event | None"]
# Output buffers per merge thread: while the writer thread writes one or two, the thread rounds into the next.
OUT_BUFFERS = 3


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor of ``shape`` as 2-D rows: (shape[0], the rest); a 1-D tensor is one column, a 0-D one 1 x 1."""
    if not shape:
        return 1, 1
    rows = shape[0]
    return rows, (math.prod(shape[1:]) if len(shape) > 1 else 1)


def block_rows(rows: int, cols: int) -> int:
    """Rows per block: about ``ROW_BLOCK_BYTES`` of fp32, in even blocks (no tiny last block)."""
    step = max(1, min(rows, ROW_BLOCK_BYTES // max(1, cols * 4)))
    blocks = -(-rows // step)
    return -(-rows // blocks)


def reads_base(out: OutputTensor) -> bool:
    """False when the first edit sets every value (a replacement saved whole): the base is never read."""
    return not (out.edits and out.edits[0].rows is None and out.edits[0].edit.overwrites)


def joins_lora_group(edit: Edit) -> bool:
    """True for the edits of a LoRA adapter (LoRA, DoRA, its bias) and full differences (kohya ``.diff``, a
    full-rank LoRA): PEFT holds several LoRA adapters in one model, where DoRA's norm is taken from the weight
    without the others' updates (lorafuse's meaning of a run of them). Any other edit (another PEFT tuner type, a
    replacement, trained token rows) can only be merged by PEFT before the next adapter is loaded, so the DoRA
    after it sees the weight that edit left."""
    return isinstance(edit, (LoraDelta, BiasDelta, FullDiff))


def unedited_points(edits: Sequence[Edit], first: int = 0) -> dict[int, bool]:
    """Where each run of ``edits`` starts (index -> whether to copy the tensor there): at ``first`` and after each
    edit outside a LoRA group (:func:`joins_lora_group`). The tensor before a run is what the run's needs-base
    edits (DoRA) read as unedited; a copy is needed where one follows the run's first edit. Shared by the kernels
    and the runtime, so that they agree."""
    starts = [first] + [i for i in range(first + 1, len(edits)) if not joins_lora_group(edits[i - 1])]
    ends = [*starts[1:], len(edits)]
    return {start: any(e.needs_base for e in edits[start + 1 : end]) for start, end in zip(starts, ends)}


def apply_edits(out: OutputTensor, block: Array, start: int, ops: BlockOps, snapshot: Callable[[Array], Array]) -> None:
    """Apply ``out``'s edits, in order, to ``block``: its fp32 rows ``start:start+len(block)``, viewed as 2-D.

    An edit on a range of rows gets the part of the block inside its range, in its own row numbering. An edit that
    reads the unedited rows (DoRA) gets them as they were before its run of LoRA adapters' edits: before the
    tensor's edits, or as the last edit of another kind (IA3, OFT, a replacement saved whole...) left them
    (:func:`unedited_points`). ``snapshot(block)`` copies the block for that.
    """
    stop = start + block.shape[0]
    edits = out.edits
    runs = unedited_points([p.edit for p in edits], 0 if reads_base(out) else 1)
    base = None
    total = matrix_shape(out.shape)[0]
    for i, placed in enumerate(edits):
        if i in runs:  # a later edit of this run changes these rows before one that needs them unedited
            base = snapshot(block) if runs[i] else None
        low, high = placed.rows or (0, total)
        lo, hi = max(start, low), min(stop, high)
        if lo >= hi:
            continue
        part = block[lo - start : hi - start]
        part_base = None if base is None else base[lo - start : hi - start]
        placed.edit.apply(part, slice(lo - low, hi - low), ops, part_base)


def require_same_shape(out: OutputTensor, stored: tuple[int, ...]) -> None:
    """A tensor computed from the base's rows keeps the base's shape (only a whole replacement may resize it)."""
    if tuple(stored) != tuple(out.shape):
        raise LorafuseError(f"tensor {out.name!r}: the plan changes its shape without replacing it whole")


class RowMerger:
    """One thread's merger: computes tensors in row blocks through buffers it keeps between blocks and tensors."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.ops = BlockOps()
        self._raw = np.empty(0, dtype=np.uint8)  # base rows as read
        self._block = np.empty(0, dtype=F32)  # fp32 math
        self._base = np.empty(0, dtype=F32)  # unedited rows, for an edit that needs them after another one
        self._outs = [np.empty(0, dtype=np.uint8) for _ in range(OUT_BUFFERS)]  # rounded rows as written
        self._pending: list[threading.Event | None] = [None] * OUT_BUFFERS  # their writes not yet done

    @staticmethod
    def _fit(buffer: np.ndarray, size: int) -> np.ndarray:
        return buffer if buffer.size >= size else np.empty(size, dtype=buffer.dtype)

    def merge(self, out: OutputTensor, emit: Emit, stopped: Callable[[], bool] = lambda: False) -> None:
        """Compute ``out`` and hand each block's output bytes to ``emit``; ``stopped()`` ends it between blocks."""
        try:
            self._merge(out, emit, stopped)
        finally:
            self.ops.forget()
            for name in ("_raw", "_block", "_base"):
                buffer = getattr(self, name)
                if buffer.nbytes > KEEP_BUFFER_BYTES:  # a whole-tensor block: do not keep it
                    setattr(self, name, np.empty(0, dtype=buffer.dtype))
            # One still being written stays alive through its memoryview until it is.
            self._outs = [b if b.nbytes <= KEEP_BUFFER_BYTES else np.empty(0, dtype=b.dtype) for b in self._outs]

    def _merge(self, out: OutputTensor, emit: Emit, stopped: Callable[[], bool]) -> None:
        base, info = self.plan.base, self.plan.base.infos[out.source]
        rows, cols = matrix_shape(out.shape)
        if rows * cols == 0:
            return
        read = reads_base(out)
        if read:
            require_same_shape(out, info.shape)
        whole = any(p.edit.whole_tensor for p in out.edits)
        step = rows if whole else block_rows(rows, cols)
        out_size = np.dtype(out.dtype).itemsize
        self._block = self._fit(self._block, step * cols)
        self._raw = self._fit(self._raw, step * cols * info.dtype.itemsize)
        for index, start in enumerate(range(0, rows, step)):
            if stopped():
                return
            ring = index % OUT_BUFFERS
            if self._pending[ring] is not None:
                self._pending[ring].wait()  # its last write is done: the buffer may be reused
                self._pending[ring] = None
            stop = min(rows, start + step)
            n = stop - start
            block = self._block[: n * cols].reshape(n, cols)
            if read:
                stored = base.elements(out.source, start * cols, stop * cols, out=self._raw)
                decode_f32(stored, info.dtype, out=block.reshape(-1))
                if out.dequant is not None:  # quantized base: stored values -> fp32 (quantized.py)
                    out.dequant.apply(base, block, start, stop, tuple(info.shape))
            apply_edits(out, block, start, self.ops, self._snapshot)
            if out.encode is not None:  # an fp8 base written in fp8: divided by the new scale (quantized.py)
                out.encode.apply(block)
            if out.dtype == F32:
                check_values(out.name, block, out.dtype, nonfinite_ok=not out.edits)
                written = emit(start * cols * out_size, array_bytes(block))
                if written is not None:
                    written.wait()  # the block buffer is the next block's
                continue
            self._outs[ring] = self._fit(self._outs[ring], step * cols * out_size)
            data = self._outs[ring][: n * cols * out_size].view(out.dtype).reshape(n, cols)
            checked_round(out.name, block, out.dtype, data, nonfinite_ok=not out.edits)
            self._pending[ring] = emit(start * cols * out_size, array_bytes(data))

    def _snapshot(self, block: np.ndarray) -> np.ndarray:
        self._base = self._fit(self._base, block.size)
        copy = self._base[: block.size].reshape(block.shape)
        np.copyto(copy, block)
        return copy


def tensor_array(out: OutputTensor, compute: Callable[[OutputTensor, Emit], None]) -> np.ndarray:
    """The output tensor ``out`` as a numpy array of its dtype, computed by ``compute(out, emit)``."""
    result = np.empty(out.nbytes, dtype=np.uint8)

    def emit(at: int, data: memoryview) -> None:
        result[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)

    compute(out, emit)
    return result.view(out.dtype).reshape(out.shape)


def compute_tensor(plan: MergePlan, out: OutputTensor, device: str = "cpu") -> np.ndarray:
    """The output tensor ``out``: base tensor, edits applied in fp32, rounded once to the output dtype (numpy).

    The same computation as a merge writes (``device="cuda"``: the CUDA kernel, engine/cuda.py).
    """
    if device != "cpu":
        check_device(device)
    if not out.edits and out.dequant is None and out.dtype == plan.base.infos[out.source].dtype:
        return plan.base.array(out.source)  # copied as it is
    if device.startswith("cuda") and out.edits:
        from .cuda import CudaMerger

        return tensor_array(out, CudaMerger(plan, device).merge)
    return tensor_array(out, RowMerger(plan).merge)


# --- the untouched tensors' NaN/Inf scan -------------------------------------------------------------------------


def _holds_nonfinite(raw: np.ndarray, code: str) -> bool:
    size, negative, positive = NONFINITE_BITS[code]
    unsigned = raw.view(f"<u{size}")
    return int(unsigned.max()) >= negative or int(unsigned.view(f"<i{size}").max()) >= positive


def _scan(plan: MergePlan, names: list[str], stopped: Callable[[], bool]) -> list[str]:
    """The names of ``names`` (untouched base tensors) that hold NaN or Inf, read in chunks (the prefill copies
    these bytes with the kernel and never reads them; this reads them once, beside the merge)."""
    base = plan.base
    found: list[str] = []
    buffer = np.empty(SCAN_CHUNK, dtype=np.uint8)
    for name in names:
        if stopped():
            break
        info = base.infos[name]
        if info.code not in NONFINITE_BITS or not info.nbytes:
            continue
        if info.offset < 0:  # a pickled checkpoint: loaded anyway
            if _holds_nonfinite(base.array(name).reshape(-1).view(np.uint8), info.code):
                found.append(name)
            continue
        chunk = SCAN_CHUNK // info.dtype.itemsize
        for start in range(0, info.numel, chunk):
            if stopped():
                break
            stop = min(info.numel, start + chunk)
            if _holds_nonfinite(base.elements(name, start, stop, out=buffer).view(np.uint8), info.code):
                found.append(name)
                break
    return found


def _scan_groups(plan: MergePlan) -> list[list[str]]:
    """The plan's untouched tensors in runs of about ``SCAN_GROUP_BYTES``, in order."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in plan.scan:
        if size >= SCAN_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += plan.base.infos[name].nbytes
    return [g for g in groups if g]


def _open_base_files(plan: MergePlan) -> None:
    """Open every base file here, on one thread: Checkpoint.fd is not meant to race (and every read goes through
    it)."""
    for path in dict.fromkeys(info.path for info in plan.base.infos.values()):
        plan.base.fd(path)


def find_nonfinite(plan: MergePlan) -> list[str]:
    """The plan's untouched base tensors that hold NaN or Inf (what :func:`run` finds beside the merge; for a dry
    run, which writes nothing)."""
    groups = _scan_groups(plan)
    if not groups:
        return []
    _open_base_files(plan)
    with ThreadPoolExecutor(min(math_threads(), len(groups)), "lorafuse-scan") as pool:
        return [name for found in pool.map(lambda group: _scan(plan, group, lambda: False), groups) for name in found]


# --- the job loop ------------------------------------------------------------------------------------------------


def copied(out: OutputTensor, plan: MergePlan) -> bool:
    """True when the output tensor is the base tensor's bytes as they are (nothing to compute)."""
    info = plan.base.infos[out.source]
    return not out.edits and out.dequant is None and out.dtype == info.dtype and tuple(out.shape) == info.shape


def run(
    plan: MergePlan,
    writer: Writer,
    slots: dict[str, Slot],
    progress: Callable[[int], None] | None = None,
    device: str = "cpu",
) -> list[str]:
    """Write every tensor of ``plan`` into ``writer`` (at ``slots``); returns the untouched base tensors that hold
    NaN or Inf (the plan's ``scan``).

    ``device="cuda"``: touched tensors are merged whole on the GPU (engine/cuda.py), two at a time (one is read
    while the other is on the GPU); the rest as on the CPU.
    """
    from ..blas_threads import BlasPool

    base = plan.base
    gpu = device.startswith("cuda")
    _open_base_files(plan)
    failed = threading.Event()
    lock = threading.Lock()
    local = threading.local()

    def done(nbytes: int) -> None:
        if progress is not None:
            with lock:
                progress(nbytes)

    def merger(out: OutputTensor) -> Any:
        kind = "gpu" if gpu and out.edits and out.encode is None else "cpu"  # fp8 re-encoding: numpy only
        if not hasattr(local, kind):
            if kind == "gpu":
                from .cuda import CudaMerger

                setattr(local, kind, CudaMerger(plan, device))
            else:
                setattr(local, kind, RowMerger(plan))
        return getattr(local, kind)

    def job(body: Callable[..., Any]) -> Callable[..., Any]:
        """``body`` as a pool job: skipped once a job failed, and a failure stops the others at once."""

        def run_body(*args: Any) -> Any:
            if failed.is_set():
                return []
            try:
                return body(*args)
            except BaseException:
                failed.set()
                raise

        return run_body

    # The writer thread where the writer has one (returns an event per block), else written here (None).
    hand_over = writer.write if gpu else getattr(writer, "submit", writer.write)

    @job
    def merge_job(out: OutputTensor, slot: Slot) -> None:
        merger(out).merge(out, lambda at, data: hand_over(slot, data, at), failed.is_set)
        done(slot.nbytes)

    @job
    def copy_job(out: OutputTensor, slot: Slot) -> None:
        info = base.infos[out.source]
        if info.offset >= 0:
            writer.copy(slot, base.fd(info.path), info.offset)
        elif slot.nbytes:
            writer.write(slot, array_bytes(base.array(out.source)))
        done(slot.nbytes)

    threads = 2 if gpu else math_threads()
    pool = ThreadPoolExecutor(threads, "lorafuse-math")
    jobs: list[Future] = []
    scans: list[Future] = []
    try:
        with BlasPool().one_thread():
            for out in plan.tensors:
                slot, info = slots[out.name], base.infos[out.source]
                if copied(out, plan):
                    if writer.holds(slot, info.path, info.offset):
                        continue  # already in place: the prefill counts its copy on the bar (merger.py)
                    jobs.append(pool.submit(copy_job, out, slot))
                else:
                    jobs.append(pool.submit(merge_job, out, slot))
            scans = [pool.submit(job(_scan), plan, group, failed.is_set) for group in _scan_groups(plan)]
            finished, _ = wait(jobs + scans, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in jobs + scans if f in finished and f.exception() is not None]
            if errors:
                raise errors[0]
            flush = getattr(writer, "flush", None)
            if flush is not None:
                flush()  # every queued block written (a failed write is this merge's error)
    except BaseException as exc:
        failed.set()  # running jobs stop at their next block; the rest never start
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(exc, (LorafuseError, KeyboardInterrupt)):
            raise
        # One line; AtomicOutput names the output and the fix of an OSError behind it (io/output.py).
        raise LorafuseError(f"writing the merged model failed: {exc}") from exc
    pool.shutdown(wait=True)
    return [name for scan in scans for name in scan.result()]
