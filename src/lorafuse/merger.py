"""`lorafuse.merge()`: fold adapters into a base model, streaming, and write a complete model folder."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .dtypes import dtype_short_name, parse_dtype
from .engine import check_device, one_math_thread, write_bin, write_safetensors
from .errors import LorafuseError
from .formats import read_adapter
from .io.checkpoint import open_model
from .io.extra_files import TOKENIZER_FILES, copy_extra_files, copy_tokenizer, read_json, update_config
from .io.output import AtomicOutput, OutputState, check_output
from .io.prefill import Prefill
from .io.writer import parse_size, write_index
from .peft_flags import strengths
from .plan import AdapterInput, MergePlan, build_plan
from .report import PROVENANCE_NAME, MergeReport, sha256_file
from .sources import resolve_merge_inputs

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lorafuse")


def _planned_files(plan: MergePlan, prefix: str, max_shard: int, out_format: str) -> list[str]:
    from .io.writer import Slot, layout_shards, shard_names

    slots = [Slot(t.name, t.dtype, t.shape, t.nbytes) for t in plan.tensors]
    count = len(layout_shards(slots, max_shard))
    if out_format == "bin":
        prefix = "pytorch_model" if prefix == "model" else prefix
    suffix = ".bin" if out_format == "bin" else ".safetensors"
    # the same list a real run reports: shards, then their index when there are several
    return shard_names(prefix, count, suffix) + ([f"{prefix}{suffix}.index.json"] if count > 1 else [])


@one_math_thread()  # plan checks and math are many small ops (see engine.one_math_thread)
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
    prefill: Prefill | None = None,
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
    ``prefill`` is the CLI's early copy of the base into the output (:func:`lorafuse.io.prefill.speculate`); the
    caller discards it afterwards.
    """
    started = time.perf_counter()
    adapter_paths = list(adapters)  # local paths once the sources are resolved below
    if not adapter_paths:
        raise LorafuseError("no adapter given: pass at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(adapter_paths)
    if len(weights) != len(adapter_paths):
        raise LorafuseError(f"{len(weights)} weights for {len(adapter_paths)} adapters: give one --weight per adapter")
    if out_format not in ("safetensors", "bin"):
        raise LorafuseError(f"unknown output format {out_format!r}: use safetensors or bin")
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
    # Again with the local paths the sources resolved to: what the final rename may replace is recorded here.
    checked = None if dry_run else check_output(output_path, overwrite, [base_path, *adapter_paths])

    checkpoint, prefix, _index = open_model(base_path)
    base_folder = base_path if base_path.is_dir() else None
    base_config = read_json(base_folder / "config.json") if base_folder else None
    inputs: list[AdapterInput] = []
    try:
        base_shapes = {name: info.shape for name, info in checkpoint.infos.items()}
        for path, weight, label in zip(adapter_paths, weights, sources.labels):
            inputs.append(
                read_adapter(path, label=label, fmt=adapter_format, weight=float(weight), base_shapes=base_shapes)
            )
        plan = build_plan(checkpoint, inputs, out_dtype, base_config, allow_unmatched=allow_unmatched)
        for warning in plan.warnings:
            log.warning(warning)
        single_file = base_folder is None and output_path.suffix == ".safetensors"
        report = MergeReport(
            base=str(base_path),
            adapters=[
                {"path": str(a), "weight": w, "format": inp.fmt, "files": {f.name: sha256_file(f) for f in inp.files}}
                for a, w, inp in zip(adapter_paths, weights, inputs)
            ],
            output=str(output_path),
            dtype=dtype_short_name(out_dtype) if out_dtype else "auto",
            format=out_format,
            tensors_total=len(plan.tensors),
            tensors_touched=len(plan.touched),
            total_bytes=plan.total_bytes,
            files=[output_path.name] if single_file else _planned_files(plan, prefix, max_shard, out_format),
            warnings=list(plan.warnings),
            config_updates=dict(plan.config_updates),
            dry_run=dry_run,
            sources=sources.provenance,
        )
        tokenizer = _resizing_tokenizer(plan, dict(zip(sources.labels, adapter_paths)), report)
        if dry_run:
            report.seconds = time.perf_counter() - started
            return report
        _write(
            plan,
            report,
            base_folder,
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
            checked,
        )
    finally:
        sources.cleanup()
        checkpoint.close()
        for inp in inputs:
            for edit in inp.edits:
                for ref in edit.edit.refs():
                    ref.checkpoint.close()
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
    weight_files: list[Path],
    prefix: str,
    output_path: Path,
    max_shard: int,
    out_format: str,
    device: str,
    out_dtype: torch.dtype | None,
    single_file: bool,
    show_progress: bool | None,
    prefill: Prefill | None = None,
    tokenizer: Path | None = None,
    checked: OutputState | None = None,
) -> None:
    """Write the merged model atomically: weights, index, the base's other files, config updates, provenance.

    ``tokenizer``: a folder whose tokenizer files replace the base's (the adapter that resized the vocabulary).
    ``checked``: what :func:`check_output` found at the output (the only thing the final rename may replace).
    """
    # None lets tqdm decide (shown on a terminal only).
    disable = None if show_progress is None else not show_progress
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging", disable=disable, leave=False)
    try:
        if single_file:
            with AtomicOutput(output_path, is_dir=False, checked=checked) as out:
                write_safetensors(plan, out.tmp.parent, prefix, max_shard, device, bar.update, single_file=out.tmp)
                out.commit()
            return
        if prefill is not None and out_format != "safetensors":
            prefill.cancel()
            prefill = None
        with AtomicOutput(output_path, adopt=prefill is not None, checked=checked) as out:
            if out_format == "bin":
                written = write_bin(plan, out.tmp, prefix, max_shard, device, bar.update)
            else:
                written = write_safetensors(plan, out.tmp, prefix, max_shard, device, bar.update, prefill=prefill)
            if written.index_name:
                write_index(out.tmp / written.index_name, list(written.slots.values()), written.files)
            report.files = written.files + ([written.index_name] if written.index_name else [])
            if base_folder is not None:
                report.copied_files = copy_extra_files(
                    base_folder, out.tmp, weight_files, {PROVENANCE_NAME}, warnings=report.warnings
                )
                if tokenizer is not None:
                    names = copy_tokenizer(tokenizer, out.tmp)
                    report.copied_files = sorted(set(report.copied_files) | set(names))
                updates = dict(plan.config_updates)
                if out_dtype is not None:
                    # transformers 5 writes "dtype", older versions "torch_dtype".
                    key = "dtype" if "dtype" in (read_json(out.tmp / "config.json") or {}) else "torch_dtype"
                    updates[key] = dtype_short_name(out_dtype)
                update_config(out.tmp / "config.json", updates)
            (out.tmp / PROVENANCE_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            out.commit()
    finally:
        bar.close()
