"""The merge loop: read each base tensor, apply its edits in fp32, round once, hand it to a writer thread.

Untouched tensors that keep their dtype are copied file-to-file by the kernel. Reading and math run on the
calling thread while a writer thread drains a short queue, so reading, math and writing overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .edits import DoraDelta
from .errors import DtypeOverflowError, LorafuseError, NonFiniteError
from .io.writer import SafetensorsShardWriter, Slot, layout_shards, shard_names, tensor_bytes
from .plan import MergePlan, OutputTensor

QUEUE_DEPTH = 4
_FINITE_LIMIT = {torch.float16: torch.finfo(torch.float16).max, torch.bfloat16: torch.finfo(torch.bfloat16).max}


@dataclass
class WrittenModel:
    """What the engine wrote: file names, index and per-tensor slots."""

    files: list[str]
    index_name: str | None
    slots: dict[str, Slot]
    bytes_written: int


def compute_tensor(plan: MergePlan, out: OutputTensor, device: str = "cpu") -> torch.Tensor:
    """The output tensor ``out``: base tensor, edits applied in fp32, rounded once to the output dtype."""
    tensor = plan.base.get(out.source)
    if not out.edits:
        if tensor.dtype != out.dtype:
            _check_range(out, tensor)
            tensor = tensor.to(out.dtype)
        return tensor
    weight = tensor.to(device=device, dtype=torch.float32)
    del tensor
    needs_base = any(isinstance(e, DoraDelta) for e in out.edits) and len(out.edits) > 1
    base = weight.clone() if needs_base else weight
    for edit in out.edits:
        weight = edit.apply(weight, base)
    if not torch.isfinite(weight).all():
        raise NonFiniteError(f"merged tensor {out.name!r} has NaN or Inf; check the adapters' weights and scales")
    _check_range(out, weight)
    return weight.to(out.dtype).cpu()


def _check_range(out: OutputTensor, tensor: torch.Tensor) -> None:
    limit = _FINITE_LIMIT.get(out.dtype)
    if limit is None or not tensor.is_floating_point() or tensor.numel() == 0:
        return
    peak = tensor.abs().max().item()
    if peak > limit:
        raise DtypeOverflowError(
            f"tensor {out.name!r} reaches {peak:.4g}, beyond the {str(out.dtype).replace('torch.', '')} range "
            f"({limit:.4g}); use --dtype bf16 or fp32"
        )


def _slots(plan: MergePlan) -> list[Slot]:
    return [Slot(t.name, t.dtype, t.shape, t.nbytes) for t in plan.tensors]


def write_safetensors(
    plan: MergePlan,
    folder: Path,
    prefix: str,
    max_shard_size: int,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    single_file: Path | None = None,
) -> WrittenModel:
    """Stream the plan into sharded safetensors in ``folder`` (or one file at ``single_file``)."""
    slots = _slots(plan)
    shards = layout_shards(slots, max_shard_size if single_file is None else 1 << 62)
    if single_file is not None:
        names = [single_file.name]
        folder = single_file.parent
    else:
        names = shard_names(prefix, len(shards), ".safetensors")
    writer = SafetensorsShardWriter(folder, shards, names)
    by_name = {s.name: s for s in slots}
    jobs: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    failure: list[BaseException] = []

    def drain() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            if failure:
                continue
            try:
                kind, slot, payload = job
                if kind == "copy":
                    fd, offset = payload
                    writer.copy_range(slot, fd, offset)
                else:
                    writer.write_bytes(slot, tensor_bytes(payload))
                if progress:
                    progress(slot.nbytes)
            except BaseException as exc:  # surfaced on the main thread
                failure.append(exc)

    thread = threading.Thread(target=drain, name="lorafuse-writer", daemon=True)
    thread.start()
    try:
        for out in plan.tensors:
            if failure:
                break
            slot = by_name[out.name]
            info = plan.base.infos[out.source]
            if not out.edits and out.dtype == info.dtype and info.offset >= 0:
                jobs.put(("copy", slot, (plan.base.fd(info.path), info.offset)))
            else:
                jobs.put(("data", slot, compute_tensor(plan, out, device)))
    finally:
        jobs.put(None)
        thread.join()
        writer.close()
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, LorafuseError) else LorafuseError(f"writing the merged model failed: {exc}")
    return WrittenModel(
        names, None if len(names) == 1 else f"{prefix}.safetensors.index.json", by_name, sum(s.nbytes for s in slots)
    )


def write_bin(
    plan: MergePlan,
    folder: Path,
    prefix: str,
    max_shard_size: int,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> WrittenModel:
    """Legacy ``pytorch_model*.bin`` shards (each shard is held in memory while it is saved)."""
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
        torch.save(state, folder / name)
        del state
    index = None if len(names) == 1 else f"{bin_prefix}.bin.index.json"
    return WrittenModel(names, index, {s.name: s for s in slots}, sum(s.nbytes for s in slots))
