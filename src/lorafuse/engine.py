"""The merge loop: read each base tensor, apply its edits in fp32, round once, hand it to a writer thread.

Untouched tensors that keep their dtype are copied file-to-file by the kernel. Tensors changed only by LoRA
deltas take the fast path: read with ``preadv`` into a reused buffer, merged in fp32 row blocks of a few MB
(``addmm_`` per block gives each element exactly the operations whole-tensor math would), rounded into a pooled
output buffer that the writer thread writes and hands back. Other edits (DoRA, replacements, diffs) use
whole-tensor math. Reading and math run on the calling thread (one torch thread, see ``one_math_thread``) while
the writer thread drains a short queue. With ``device="cuda"`` each touched tensor is merged whole on the GPU.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .edits import DoraDelta, LoraDelta
from .errors import DtypeOverflowError, LorafuseError, NonFiniteError
from .io.byte_view import byte_view
from .io.output import save_torch_file
from .io.prefill import Prefill
from .io.safetensors_file import TensorInfo, pread_into
from .io.writer import SafetensorsShardWriter, Slot, layout_shards, safetensors_header, shard_names, tensor_bytes
from .math_threads import MATH_THREADS, math_threads  # noqa: F401  (MATH_THREADS: re-exported)
from .plan import MergePlan, OutputTensor

QUEUE_DEPTH = 4
# Writes into one file serialize on its inode lock, and a second writer thread only spins on it (measured: 4x
# the kernel time), so one writer overlaps with the reading and math of the calling thread.
WRITER_THREADS = 1
# fp32 scratch of one row block: small enough to stay in cache between the upcast, addmm_ and downcast.
ROW_BLOCK_BYTES = 4 << 20
# Fewer rows than this per block and the whole tensor is one block (a 1-row addmm_ may take a gemv path).
MIN_BLOCK_ROWS = 16
# Pooled output buffers above this size are used once and freed, so one huge tensor does not pin memory.
POOL_MAX_BYTES = 256 << 20
# Bytes of merged tensors computed but not yet written (one tensor may exceed it, alone).
IN_FLIGHT_BYTES = 256 << 20
_FINITE_LIMIT = {torch.float16: torch.finfo(torch.float16).max, torch.bfloat16: torch.finfo(torch.bfloat16).max}


@dataclass
class WrittenModel:
    """What the engine wrote: file names, index and per-tensor slots."""

    files: list[str]
    index_name: str | None
    slots: dict[str, Slot]
    bytes_written: int


@contextmanager
def one_math_thread() -> Iterator[None]:
    """Run torch's CPU math on one thread (restored after); usable as ``with`` or as a decorator.

    A merge is many small ops: OpenMP hand-offs cost more than a second thread gains (on a busy machine, 10-40x
    more), and the other core is better spent on the writer thread and the kernel's copies.
    """
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


DEVICE_RE = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device(device: str) -> str:
    """``device`` when lorafuse can run its math there (cpu, cuda, cuda:N on this machine); else one line naming it
    and the choices. Every command that takes ``--device`` comes through here (merge, extract, verify, lora-merger)."""
    if not isinstance(device, str) or not DEVICE_RE.fullmatch(device):
        raise LorafuseError(f"--device {device!r} is not a device lorafuse can use: choose cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LorafuseError("--device cuda was asked for but no CUDA device is available: use --device cpu")
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise LorafuseError(
                f"--device {device}: this machine has {count} CUDA device(s): use cuda:0 to cuda:{count - 1}"
            )
    return device


def compute_tensor(plan: MergePlan, out: OutputTensor, device: str = "cpu") -> torch.Tensor:
    """The output tensor ``out``: base tensor, edits applied in fp32, rounded once to the output dtype."""
    if device != "cpu":
        check_device(device)
    tensor = plan.base.get(out.source)
    if out.dequant is not None:  # quantized base: stored tensor -> fp32 first (quantized.py)
        tensor = out.dequant(plan.base, tensor)
    if not out.edits:
        if tensor.dtype != out.dtype:
            _check_range(out, tensor)
            tensor = tensor.to(out.dtype)
        return tensor
    return _merge_whole(out, tensor, device).cpu()


def _merge_whole(out: OutputTensor, tensor: torch.Tensor, device: str) -> torch.Tensor:
    """Whole-tensor math on ``device``: fp32 copy, edits in order, one rounding to the output dtype, checked."""
    # Moved in its own dtype, converted where the math runs: half the bytes over the bus for bf16/fp16.
    weight = tensor.to(device=device).to(torch.float32)
    del tensor
    needs_base = any(isinstance(e, DoraDelta) for e in out.edits) and len(out.edits) > 1
    base = weight.clone() if needs_base else weight
    for edit in out.edits:
        weight = edit.apply(weight, base)
    _check_merged(out, weight)
    return weight.to(out.dtype)


def _on_accelerator(device: str) -> bool:
    """True for a GPU-like device (its copies want page-locked host memory); "cpu:0" is the CPU."""
    return torch.device(device).type != "cpu"


def _check_merged(out: OutputTensor, exact: torch.Tensor) -> None:
    """NaN/Inf in the fp32 result, or a value beyond the output dtype's range, is an error."""
    if exact.numel() == 0:
        return
    # One pass, no mask: NaN propagates into min and max, Inf shows as one of them.
    low, high = (v.item() for v in torch.aminmax(exact))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise NonFiniteError(f"merged tensor {out.name!r} has NaN or Inf; check the adapters' weights and scales")
    limit = _FINITE_LIMIT.get(out.dtype)
    if limit is not None and max(-low, high) > limit:
        raise DtypeOverflowError(
            f"tensor {out.name!r} reaches {max(-low, high):.4g}, beyond the {str(out.dtype).replace('torch.', '')} "
            f"range ({limit:.4g}); use --dtype bf16 or fp32"
        )


def _check_range(out: OutputTensor, tensor: torch.Tensor) -> None:
    limit = _FINITE_LIMIT.get(out.dtype)
    if limit is None or not tensor.is_floating_point() or tensor.numel() == 0:
        return
    peak = tensor.abs().max().item()
    if not math.isfinite(peak):  # the base's own NaN/Inf stay NaN/Inf in any dtype (the plan warns): judge the rest
        finite = tensor[torch.isfinite(tensor)]
        peak = finite.abs().max().item() if finite.numel() else 0.0
    if peak > limit:
        raise DtypeOverflowError(
            f"tensor {out.name!r} reaches {peak:.4g}, beyond the {str(out.dtype).replace('torch.', '')} range "
            f"({limit:.4g}); use --dtype bf16 or fp32"
        )


def _lora_only(out: OutputTensor, info: TensorInfo) -> bool:
    """True when the fast path applies: plain LoRA deltas on a float safetensors tensor with rows."""
    return (
        bool(out.edits)
        and out.dequant is None
        and info.offset >= 0
        and info.dtype.is_floating_point
        and len(info.shape) >= 2
        and math.prod(info.shape) > 0
        and all(type(e) is LoraDelta for e in out.edits)  # exact type: DoRA subclasses need whole rows of W0
    )


class _BufferPool:
    """Output byte buffers passed to the writer thread and back, within a budget of bytes in flight.

    Fresh buffers per tensor would cost page faults, and a budget (rather than a count) keeps peak memory flat
    whatever the size of the model's largest tensors.
    """

    def __init__(self, budget: int, pinned: bool = False):
        self._budget = budget
        self._pinned = pinned  # page-locked buffers, for results copied back from an accelerator
        self._held = 0
        self._charged: dict[int, int] = {}
        self._free: list[torch.Tensor] = []
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes``; blocks while the bytes in flight would exceed the budget."""
        with self._cond:
            self._cond.wait_for(lambda: self._held == 0 or self._held + nbytes <= self._budget)
            self._held += nbytes
            # The smallest free buffer that fits (by position: tensors do not compare with ==).
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buf = self._free.pop(min(fitting, key=lambda i: self._free[i].numel())) if fitting else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned)
        with self._cond:
            self._charged[id(buf)] = nbytes
        return buf

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._held -= self._charged.pop(id(buf))
            if buf.numel() <= POOL_MAX_BYTES:
                self._free.append(buf)
                self._free.sort(key=torch.Tensor.numel)
                while sum(b.numel() for b in self._free) > self._budget:
                    self._free.pop(0)
            self._cond.notify_all()


class _RowMerger:
    """Merges LoRA-only tensors one row block at a time: pread the block's rows into a reused input buffer, fp32
    math in a reused scratch block, rounded into ``dst``. Per thread, memory is one block, whatever the tensor."""

    def __init__(self, plan: MergePlan, device: str):
        self.plan = plan
        self.device = device
        self._input = torch.empty(0, dtype=torch.uint8)
        self._scratch = torch.empty(0, dtype=torch.float32)

    def _read(self, info: TensorInfo, start: int = 0, rows: int | None = None) -> torch.Tensor:
        """Rows ``start:start+rows`` of the base tensor (all of it by default), in the reused input buffer."""
        rows = info.shape[0] if rows is None else rows
        row_bytes = info.nbytes // info.shape[0]
        nbytes = rows * row_bytes
        if self._input.numel() < nbytes:
            # Page-locked for an accelerator: its copies from pinned memory run at full bus speed.
            self._input = torch.empty(nbytes, dtype=torch.uint8, pin_memory=_on_accelerator(self.device))
        raw = self._input[:nbytes]
        pread_into(self.plan.base.fd(info.path), byte_view(raw), info.offset + start * row_bytes, info.path)
        return raw.view(info.dtype).view(rows, *info.shape[1:])

    def merge_into(self, out: OutputTensor, info: TensorInfo, dst: torch.Tensor) -> None:
        """Write the merged tensor's bytes into ``dst`` (a uint8 buffer of at least ``out.nbytes``)."""
        try:
            self._merge(out, info, dst)
        finally:
            if self._input.numel() > POOL_MAX_BYTES:  # a huge tensor (a LoRA'd embedding): do not keep its buffer
                self._input = torch.empty(0, dtype=torch.uint8)

    def _merge(self, out: OutputTensor, info: TensorInfo, dst: torch.Tensor) -> None:
        target = dst[: out.nbytes].view(out.dtype).view(out.shape)
        if self.device != "cpu":  # an accelerator takes the whole tensor at once
            target.copy_(_merge_whole(out, self._read(info), self.device))
            return
        rows = info.shape[0]
        cols = math.prod(info.shape) // rows
        factors = []
        for edit in out.edits:
            assert isinstance(edit, LoraDelta)
            a, b = edit.A.load(), edit.B.load()
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            # W (out, in) += s * B @ A; transposed W (in, out) += s * A.T @ B.T: both split by rows of W.
            left, right = (a2.T, b2.T) if edit.layout == "transposed" else (b2, a2)
            factors.append((left, right, edit.scale))
        step = ROW_BLOCK_BYTES // (cols * 4)
        if step < MIN_BLOCK_ROWS:
            step = rows
        blocks = -(-rows // step)
        step = -(-rows // blocks)  # even blocks: no tiny last block
        if self._scratch.numel() < step * cols:
            self._scratch = torch.empty(step * cols, dtype=torch.float32)
        dst2 = target.view(rows, cols)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = self._scratch[: (stop - start) * cols].view(stop - start, cols)
            block.copy_(self._read(info, start, stop - start).view(stop - start, cols))
            for left, right, scale in factors:
                block.addmm_(left[start:stop], right, alpha=scale)
            _check_merged(out, block)
            dst2[start:stop].copy_(block)


def _slots(plan: MergePlan) -> list[Slot]:
    return [Slot(t.name, t.dtype, t.shape, t.nbytes) for t in plan.tensors]


@one_math_thread()
def write_safetensors(
    plan: MergePlan,
    folder: Path,
    prefix: str,
    max_shard_size: int,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    single_file: Path | None = None,
    prefill: Prefill | None = None,
) -> WrittenModel:
    """Stream the plan into sharded safetensors in ``folder`` (or one file at ``single_file``).

    ``prefill`` (io/prefill.py) is the CLI's early copy of the base into ``folder``: used when its layout is this
    plan's, else stopped and its files removed first.
    """
    check_device(device)
    slots = _slots(plan)
    shards = layout_shards(slots, max_shard_size if single_file is None else 1 << 62)
    if single_file is not None:
        names = [single_file.name]
        folder = single_file.parent
    else:
        names = shard_names(prefix, len(shards), ".safetensors")
    if prefill is not None:
        same = single_file is None and prefill.tmp == folder
        if not (same and prefill.matches(names, [safetensors_header(shard) for shard in shards])):
            prefill.cancel()
            prefill = None
    try:
        _stream(plan, folder, shards, names, slots, device, progress, prefill)
    except BaseException:
        if prefill is not None:
            prefill.cancel()
        raise
    return WrittenModel(
        names,
        None if len(names) == 1 else f"{prefix}.safetensors.index.json",
        {s.name: s for s in slots},
        sum(s.nbytes for s in slots),
    )


def _stream(
    plan: MergePlan,
    folder: Path,
    shards: list[list[Slot]],
    names: list[str],
    slots: list[Slot],
    device: str,
    progress: Callable[[int], None] | None,
    prefill: Prefill | None,
) -> None:
    writer = SafetensorsShardWriter(folder, shards, names, existing=prefill is not None)
    by_name = {s.name: s for s in slots}
    jobs: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    pool = _BufferPool(IN_FLIGHT_BYTES, pinned=_on_accelerator(device))
    mergers = threading.local()  # one _RowMerger (input buffer, fp32 scratch) per math thread
    failure: list[BaseException] = []
    progress_lock = threading.Lock()

    def merge_job(out: OutputTensor, info: TensorInfo, slot: Slot, buf: torch.Tensor) -> None:
        try:
            if failure:
                pool.release(buf)
                return
            if not hasattr(mergers, "merger"):
                mergers.merger = _RowMerger(plan, device)
            mergers.merger.merge_into(out, info, buf)
        except BaseException as exc:
            pool.release(buf)
            failure.append(exc)
            return
        jobs.put(("pooled", slot, buf))

    def drain() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            kind, slot, payload = job
            try:
                if failure:
                    continue
                if prefill is not None:  # the prefill must not copy base bytes over what is written here
                    prefill.wait_for(slot.name)
                if kind == "prefilled":
                    pass
                elif kind == "copy":
                    fd, offset = payload
                    writer.copy_range(slot, fd, offset)
                elif kind == "pooled":
                    writer.write_bytes(slot, byte_view(payload[: slot.nbytes]))
                else:
                    writer.write_bytes(slot, tensor_bytes(payload))
                if progress:
                    with progress_lock:
                        progress(slot.nbytes)
            except BaseException as exc:  # surfaced on the main thread
                failure.append(exc)
            finally:
                if kind == "pooled":
                    pool.release(payload)

    threads = [threading.Thread(target=drain, name=f"lorafuse-writer-{i}", daemon=True) for i in range(WRITER_THREADS)]
    for thread in threads:
        thread.start()
    # An accelerator merges whole tensors; two threads, so that one reads while the other's tensor is on the GPU.
    workers = math_threads() if device == "cpu" else 2
    math_pool = ThreadPoolExecutor(workers, "lorafuse-math") if workers > 1 else None
    try:
        for out in plan.tensors:
            if failure:
                break
            slot = by_name[out.name]
            info = plan.base.infos[out.source]
            if not out.edits and out.dequant is None and out.dtype == info.dtype and info.offset >= 0:
                if prefill is not None and prefill.holds(slot.name, info.path, info.offset):
                    jobs.put(("prefilled", slot, None))
                else:
                    jobs.put(("copy", slot, (plan.base.fd(info.path), info.offset)))
            elif _lora_only(out, info):
                buf = pool.acquire(out.nbytes)  # here, so that waiting for memory holds back the loop
                if math_pool is not None:
                    math_pool.submit(merge_job, out, info, slot, buf)
                else:
                    merge_job(out, info, slot, buf)
            else:
                jobs.put(("data", slot, compute_tensor(plan, out, device)))
    except BaseException as exc:
        failure.append(exc)  # the writers skip what is still queued
        raise
    finally:
        if math_pool is not None:
            math_pool.shutdown(wait=True)  # its jobs reach the queue before the stop marks
        for _ in threads:
            jobs.put(None)  # one stop mark per writer
        for thread in threads:
            thread.join()
        writer.close()
    if failure:
        exc = failure[0]
        if isinstance(exc, (LorafuseError, KeyboardInterrupt)):
            raise exc
        raise LorafuseError(f"writing the merged model failed: {exc}") from exc
    if prefill is not None:
        prefill.finish()


def write_bin(
    plan: MergePlan,
    folder: Path,
    prefix: str,
    max_shard_size: int,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> WrittenModel:
    """Legacy ``pytorch_model*.bin`` shards (each shard is held in memory while it is saved)."""
    check_device(device)
    slots = _slots(plan)
    shards = layout_shards(slots, max_shard_size)
    bin_prefix = "pytorch_model" if prefix == "model" else prefix
    names = shard_names(bin_prefix, len(shards), ".bin")
    outputs = {t.name: t for t in plan.tensors}
    for name, shard in zip(names, shards):
        state = {}
        for slot in shard:
            state[slot.name] = compute_tensor(plan, outputs[slot.name], device).contiguous()
            if progress:
                progress(slot.nbytes)
        save_torch_file(state, folder / name)  # a full disk is an OSError, not torch's RuntimeError
        del state
    index = None if len(names) == 1 else f"{bin_prefix}.bin.index.json"
    return WrittenModel(names, index, {s.name: s for s in slots}, sum(s.nbytes for s in slots))
