"""The one merge pipeline: sources -> formats -> plan -> kernel -> writer -> report.

``lorafuse.merge()`` (the Python API), ``lorafuse merge`` (the CLI), ``merge-adapter`` and ``lora-merger`` all merge
through here, so every decision is made once and the same inputs give the same bytes whichever of them ran:

- **prefill** (io/prefill.py): for a local folder of safetensors merged into a folder with its dtypes kept, the
  base's tensors are copied into the output in the background as soon as the output is checked, while the
  adapters are read and the plan is built; the kernel then writes only what changed, over pages that exist
  (5-10x cheaper than fresh ones). A plan whose layout differs from the guess stops and removes the copy first.
- **kernel** (engine/kernel.py): numpy, row blocks, one rounding; ``--device cuda`` merges touched tensors with
  the torch kernel (engine/cuda.py), the same plan and edits.
- **writers** (writers/, registered by name): sharded safetensors with an index, one file, or ``.bin`` (the torch
  extra); the writer lays out the files, the kernel only hands it each tensor's bytes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .arrays import code_of, parse_dtype, short_name
from .engine import kernel
from .errors import LorafuseError
from .formats import read_adapter
from .io import prefill as prefill_io
from .io.checkpoint import Checkpoint, open_model
from .io.extra_files import TOKENIZER_FILES, read_json
from .io.layout import Slot, parse_size
from .io.output import AtomicOutput, OutputState, check_output
from .io.prefill import Prefill
from .peft_flags import strengths
from .plan import AdapterInput, MergePlan, build_plan, nonfinite_warning
from .report import MergeReport, sha256_file
from .sources import resolve_merge_inputs
from .torch_bridge import check_device
from .writers import get_writer
from .writers.folder import finish_folder
from .writers.provenance import provenance_metadata

log = logging.getLogger("lorafuse")


@dataclass
class WrittenModel:
    """What the kernel wrote: the files (shards, then their index), per-tensor slots and the untouched tensors
    holding NaN/Inf."""

    files: list[str]
    slots: dict[str, Slot]
    bytes_written: int
    nonfinite: list[str]


def output_slots(plan: MergePlan) -> list[Slot]:
    return [Slot(t.name, code_of(t.dtype), t.shape, t.nbytes) for t in plan.tensors]


def start_prefill(
    base: Path, output: Path, max_shard_size: str | int, overwrite: bool, inputs: Sequence[Path], dtype: Any, fmt: str
) -> Prefill | None:
    """The prefill, where it can apply: a local base folder, a folder output of a format that can adopt it
    (safetensors), dtypes kept.

    ``LORAFUSE_PREFILL=0`` turns it off. None when it does not apply (io/prefill.speculate says why not).
    """
    if os.environ.get("LORAFUSE_PREFILL", "1") == "0" or not get_writer(fmt).uses_prefill or dtype is not None:
        return None
    if not base.is_dir():
        return None
    return prefill_io.speculate(base, output, max_shard_size, overwrite, list(inputs))


def write_model(
    plan: MergePlan,
    folder: Path,
    prefix: str,
    max_shard_size: int,
    out_format: str = "safetensors",
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    single_file: Path | None = None,
    prefill: Prefill | None = None,
    metadata: dict[str, str] | None = None,
) -> WrittenModel:
    """Stream the plan through the kernel into the ``out_format`` writer's files in ``folder`` (or one file at
    ``single_file``), index included.

    ``prefill``: an early copy of the base into ``folder``; used when its layout is this plan's, else stopped and its
    files removed first (the caller discards it afterwards either way). ``metadata``: strings stored in each
    file by formats that hold them (safetensors).
    """
    check_device(device)
    writer = get_writer(out_format)
    writer.check_available()
    slots = output_slots(plan)
    if single_file is not None:
        folder = single_file.parent
    layout = writer.layout(slots, prefix, max_shard_size, single_file.name if single_file is not None else None)
    if prefill is not None:
        headers = writer.prefill_headers(layout) if single_file is None and metadata is None else None
        if headers is None or prefill.tmp != folder or not prefill.matches(layout.names, headers):
            prefill.cancel()
            prefill = None
        else:
            prefill.skip({t.name for t in plan.tensors if not kernel.copied(t, plan)})
    sink = writer.open(folder, layout, metadata, prefill)
    try:
        nonfinite = kernel.run(plan, sink, {s.name: s for s in slots}, progress, device)
        if prefill is not None:
            prefill.finish()  # its failure (disk full) is this merge's
    except BaseException:
        if prefill is not None:
            prefill.cancel()
        raise
    finally:
        sink.close()
    writer.finish(folder, layout)
    return WrittenModel(layout.files, {s.name: s for s in slots}, sum(s.nbytes for s in slots), nonfinite)


def plan_merge(
    checkpoint: Checkpoint,
    inputs: list[AdapterInput],
    dtype: np.dtype | None,
    base_config: dict[str, Any] | None,
    allow_unmatched: bool = False,
) -> MergePlan:
    """The merge plan, its warnings logged."""
    plan = build_plan(checkpoint, inputs, dtype, base_config, allow_unmatched=allow_unmatched)
    for warning in plan.warnings:
        log.warning(warning)
    return plan


def report_nonfinite(found: list[str], warnings: list[str]) -> None:
    """Log and record the warning for untouched base tensors that hold NaN or Inf."""
    warning = nonfinite_warning(found)
    if warning is not None:
        log.warning(warning)
        warnings.append(warning)


def close_adapters(inputs: list[AdapterInput]) -> None:
    for inp in inputs:
        for targeted in inp.edits:
            for ref in targeted.edit.refs():
                ref.checkpoint.close()


def merge(
    base: str | Path | None,
    adapters: Sequence[str | Path],
    output: str | Path,
    weights: Sequence[float] | None = None,
    dtype: str | None = "auto",
    max_shard_size: str | int = "5GB",
    out_format: str = "safetensors",
    device: str = "cpu",
    dry_run: bool = False,
    overwrite: bool = False,
    adapter_format: str | None = None,
    show_progress: bool | None = None,
    *,
    adapter_ref: str | Sequence[str | None] | None = None,
    adapter_subfolder: str | Sequence[str | None] | None = None,
    adapter_config: str | Path | Mapping[str, Any] | Sequence[Any] | None = None,
    cache_dir: str | Path | None = None,
    base_revision: str | None = None,
    work_dir: str | Path | None = None,
    default_hub: str = "hf",
    allow_unmatched: bool = False,
) -> MergeReport:
    """Merge ``adapters`` (in order, each scaled by its weight) into ``base`` and write the result to ``output``.

    ``base`` is a model folder or a single ``.safetensors`` file; ``output`` a folder (or, for a single-file
    base, a ``.safetensors`` path). Nothing is written with ``dry_run``. Raises :class:`LorafuseError` subclasses
    with one-line messages on bad input.

    ``base`` and each adapter may also be ``hf://ORG/NAME[@REV]``, ``ms://ORG/NAME[@REV]``, a bare ``ORG/NAME``
    (``default_hub`` decides which hub) or a git URL; ``base=None`` takes the base named by the first adapter's
    ``adapter_config.json``. ``adapter_ref``/``adapter_subfolder``/``adapter_config``, ``cache_dir``,
    ``base_revision`` and ``work_dir`` are described in :func:`lorafuse.sources.resolve_merge_inputs`.
    ``allow_unmatched`` skips (with a warning) adapter tensors whose target the base does not have.
    ``out_format="bin"`` and ``device="cuda"`` need the torch extra.
    """
    started = time.perf_counter()
    adapter_paths = list(adapters)  # local paths once the sources are resolved below
    if not adapter_paths:
        raise LorafuseError("no adapter given: pass at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(adapter_paths)
    if len(weights) != len(adapter_paths):
        raise LorafuseError(f"{len(weights)} weights for {len(adapter_paths)} adapters: give one --weight per adapter")
    get_writer(out_format).check_available()  # an unknown format, or one that needs torch where it is missing
    weights = strengths(weights, "--weight")
    check_device(device)
    out_dtype = parse_dtype(dtype)
    max_shard = parse_size(max_shard_size)
    output_path = Path(output)
    if not dry_run:
        # Refuse a used output before downloading or cloning anything.
        check_output(output_path, overwrite, [Path(p) for p in (base, *adapters) if p is not None and Path(p).exists()])
    sources = resolve_merge_inputs(
        base,
        adapters,
        adapter_ref=adapter_ref,
        adapter_subfolder=adapter_subfolder,
        adapter_config=adapter_config,
        cache_dir=cache_dir,
        base_revision=base_revision,
        work_dir=work_dir,
        adapter_format=adapter_format,
        default_hub=default_hub,
    )
    base_path, adapter_paths = sources.base, sources.adapters
    prefill = None
    inputs: list[AdapterInput] = []
    checkpoint = None
    try:
        # Again with the local paths the sources resolved to: what the final rename may replace is recorded here.
        checked = None if dry_run else check_output(output_path, overwrite, [base_path, *adapter_paths])
        if not dry_run:
            prefill = start_prefill(base_path, output_path, max_shard, overwrite, adapter_paths, out_dtype, out_format)
        checkpoint, prefix, _index = open_model(base_path)
        base_folder = base_path if base_path.is_dir() else None
        base_config = read_json(base_folder / "config.json") if base_folder else None
        base_shapes = {name: info.shape for name, info in checkpoint.infos.items()}
        for path, weight, label in zip(adapter_paths, weights, sources.labels):
            inputs.append(
                read_adapter(path, label=label, fmt=adapter_format, weight=float(weight), base_shapes=base_shapes)
            )
        plan = plan_merge(checkpoint, inputs, out_dtype, base_config, allow_unmatched)
        single_file = base_folder is None and output_path.suffix == ".safetensors"
        report = MergeReport(
            base=str(base_path),
            adapters=[
                {"path": str(a), "weight": w, "format": inp.fmt, "files": {f.name: sha256_file(f) for f in inp.files}}
                for a, w, inp in zip(adapter_paths, weights, inputs)
            ],
            output=str(output_path),
            dtype=short_name(out_dtype) if out_dtype is not None else "auto",
            format=out_format,
            tensors_total=len(plan.tensors),
            tensors_touched=len(plan.touched),
            total_bytes=plan.total_bytes,
            files=[output_path.name]
            if single_file
            else get_writer(out_format).layout(output_slots(plan), prefix, max_shard).files,
            warnings=list(plan.warnings),
            config_updates=dict(plan.config_updates),
            dry_run=dry_run,
            sources=sources.provenance,
            engine="cuda" if device.startswith("cuda") else "numpy",
        )
        tokenizer = _resizing_tokenizer(plan, dict(zip(sources.labels, adapter_paths)), report)
        if dry_run:
            report_nonfinite(kernel.find_nonfinite(plan), report.warnings)
            report.seconds = time.perf_counter() - started
            return report
        assert checked is not None
        _write(
            plan,
            report,
            base_folder,
            checkpoint.metadata,
            checkpoint.files,
            prefix,
            output_path,
            max_shard,
            out_format,
            device,
            out_dtype,
            single_file,
            show_progress,
            prefill,
            tokenizer,
            prefill.checked if prefill is not None else checked,
        )
    finally:
        if prefill is not None:
            prefill.discard()  # removes its folder unless the merge turned it into the output
        sources.cleanup()
        if checkpoint is not None:
            checkpoint.close()
        close_adapters(inputs)
    report.seconds = time.perf_counter() - started
    return report


def _resizing_tokenizer(plan: MergePlan, paths: dict[str, Path], report: MergeReport) -> Path | None:
    """The adapter folder whose tokenizer goes with a resized vocabulary (the last resizing adapter that has one)."""
    if not plan.resized_by:
        return None
    for label in reversed(plan.resized_by):
        folder = paths.get(label)
        if folder is not None and folder.is_dir() and any((folder / n).is_file() for n in TOKENIZER_FILES):
            message = f"the tokenizer files come from {folder}, which resized the vocabulary"
            log.warning(message)
            report.warnings.append(message)
            return folder
    message = (
        "the adapters resize the vocabulary but hold no tokenizer files: copy the tokenizer you trained with "
        "into the merged folder (the base's does not know the added tokens)"
    )
    log.warning(message)
    report.warnings.append(message)
    return None


def _write(
    plan: MergePlan,
    report: MergeReport,
    base_folder: Path | None,
    base_metadata: dict[str, str],
    weight_files: list[Path],
    prefix: str,
    output_path: Path,
    max_shard: int,
    out_format: str,
    device: str,
    out_dtype: np.dtype | None,
    single_file: bool,
    show_progress: bool | None,
    prefill: Prefill | None,
    tokenizer: Path | None,
    checked: OutputState,
) -> None:
    """Write the merged model atomically: weights and index, then (a folder) the base's other files, config
    updates and provenance, or (one safetensors file) the base file's metadata and the provenance key.

    ``tokenizer``: a folder whose tokenizer files replace the base's (the adapter that resized the vocabulary).
    ``checked``: what :func:`check_output` found at the output (the only thing the final rename may replace).
    """
    # None lets tqdm decide (shown on a terminal only).
    disable = None if show_progress is None else not show_progress
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=disable, leave=False)
    try:
        if single_file:
            with AtomicOutput(output_path, is_dir=False, checked=checked) as out:
                metadata = provenance_metadata(base_metadata, report)
                written = write_model(
                    plan,
                    out.tmp.parent,
                    prefix,
                    max_shard,
                    device=device,
                    progress=bar.update,
                    single_file=out.tmp,
                    metadata=metadata,
                )
                report_nonfinite(written.nonfinite, report.warnings)
                out.commit()
            return
        with AtomicOutput(output_path, adopt=prefill is not None, checked=checked) as out:
            if prefill is not None and prefill.tmp != out.tmp:
                raise OSError(f"the prefilled folder {prefill.tmp} is not the output's temporary folder {out.tmp}")
            written = write_model(plan, out.tmp, prefix, max_shard, out_format, device, bar.update, prefill=prefill)
            report_nonfinite(written.nonfinite, report.warnings)
            report.files = written.files
            finish_folder(out.tmp, report, base_folder, weight_files, plan.config_updates, out_dtype, tokenizer)
            out.commit()
    finally:
        bar.close()
