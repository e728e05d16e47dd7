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

from .arrays import code_of, short_name
from .batch.shard_merge import ShardRun, write_sharded
from .batch.shard_merge import available_check as check_shard_run
from .conv1d import conv1d_modules as parse_conv1d_modules
from .engine import kernel
from .errors import LorafuseError
from .formats import read_adapter
from .io import prefill as prefill_io
from .io.checkpoint import Checkpoint, open_model
from .io.extra_files import TokenizerFiles, extra_file_names, find_tokenizer, read_json
from .io.layout import Slot, parse_size
from .io.output import AtomicOutput, OutputState, check_output
from .io.prefill import Prefill
from .part_weights import recorded as recorded_part_weights
from .part_weights import set_part_weights
from .part_weights import specs_of as part_weights_of
from .peft_flags import strengths
from .pipeline import Pipeline, is_pipeline, open_pipeline, write_pipeline
from .pipeline import check_request as check_pipeline_request
from .plan import AdapterInput, MergePlan, build_plan, nonfinite_warning
from .progress import ByteBar, PrefillProgress
from .quantized import measure_fp8_scales, parse_merge_dtype
from .report import PROVENANCE_NAME, MergeReport, sha256_file
from .sources import resolve_merge_inputs
from .torch_bridge import check_device
from .writers import ModelWriter, get_writer
from .writers.folder import finish_folder
from .writers.gguf import check_gguf_base, check_gguf_request, write_gguf
from .writers.model_card import CARD_NAME
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
    base: Path,
    output: Path,
    max_shard_size: str | int,
    overwrite: bool,
    inputs: Sequence[Path],
    dtype: Any,
    fmt: str,
    progress: PrefillProgress | None = None,
) -> Prefill | None:
    """The prefill, where it can apply: a local base folder, a folder output of a format that can adopt it
    (safetensors), dtypes kept.

    ``LORAFUSE_PREFILL=0`` turns it off. None when it does not apply (io/prefill.speculate says why not).
    ``progress`` counts its copy on the merge's bar.
    """
    if os.environ.get("LORAFUSE_PREFILL", "1") == "0" or not get_writer(fmt).uses_prefill or dtype is not None:
        return None
    if not base.is_dir():
        return None
    on_copy = progress.copied if progress is not None else None
    return prefill_io.speculate(base, output, max_shard_size, overwrite, list(inputs), on_copy)


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
    prefill_progress: PrefillProgress | None = None,
    writer: ModelWriter | None = None,
) -> WrittenModel:
    """Stream the plan through the kernel into the ``out_format`` writer's files in ``folder`` (or one file at
    ``single_file``), index included.

    ``prefill``: an early copy of the base into ``folder``; used when its layout is this plan's, else stopped and its
    files removed first (the caller discards it afterwards either way). ``metadata``: strings stored in each
    file by formats that hold them (safetensors). ``progress`` is told the bytes of each tensor written; the
    tensors the prefill holds are counted as it copies them, through ``prefill_progress`` (the one it reports to).
    ``writer``: one the caller set up (GGUF), instead of ``out_format``'s.
    """
    check_device(device)
    writer = writer or get_writer(out_format)
    writer.check_available()
    measure_fp8_scales(plan)  # merged fp8 weights of a scaled fp8 base: their new scales, before any byte
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
    by_name = {s.name: s for s in slots}
    if prefill is not None and prefill_progress is not None and progress is not None:
        infos = plan.base.infos
        held = {
            t.name
            for t in plan.tensors
            if kernel.copied(t, plan) and sink.holds(by_name[t.name], infos[t.source].path, infos[t.source].offset)
        }  # what the kernel leaves to the prefill (the same test as the kernel's)
        prefill_progress.attach(progress, held)
    try:
        nonfinite = kernel.run(plan, sink, by_name, progress, device)
        if prefill is not None:
            prefill.finish()  # its failure (disk full) is this merge's
    except BaseException:
        if prefill is not None:
            prefill.cancel()
        raise
    finally:
        if prefill_progress is not None:
            prefill_progress.detach()
        sink.close()
    writer.finish(folder, layout)
    return WrittenModel(layout.files, {s.name: s for s in slots}, sum(s.nbytes for s in slots), nonfinite)


def plan_merge(
    checkpoint: Checkpoint,
    inputs: list[AdapterInput],
    dtype: np.dtype | None,
    base_config: dict[str, Any] | None,
    allow_unmatched: bool = False,
    conv1d_modules: frozenset[str] | None = None,
) -> MergePlan:
    """The merge plan, its warnings logged."""
    plan = build_plan(
        checkpoint, inputs, dtype, base_config, allow_unmatched=allow_unmatched, conv1d_modules=conv1d_modules
    )
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
    conv1d_modules: str | Sequence[str] | None = None,
    outtype: str = "auto",
    requant: str = "q8_0",
    part_weights: Sequence[Mapping[str, float] | None] | Sequence[str] | None = None,
    shard_run: ShardRun | None = None,
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
    ``conv1d_modules`` names the base's GPT-2 Conv1D modules ("c_attn,c_proj", or "none") where its config.json
    cannot tell (a single file, custom code): square 2-D LoRA updates are refused without one of the two.
    ``out_format="bin"`` and ``device="cuda"`` need the torch extra; ``out_format="gguf"`` (one ``.gguf`` file at
    ``output``, ``outtype`` its tensor type; implied by an ``output`` ending in ``.gguf``; from a ``.gguf`` base,
    ``requant`` the type of merged tensors gguf-py cannot quantize back: writers/gguf.py) the gguf extra.
    ``part_weights``: per-part strengths of diffusion LoRAs, as ``--part-weight`` strings (``"te=0.5"``,
    ``"2:unet=0.8"``) or one ``{PART: W}`` mapping per adapter (part_weights.py), on top of ``weights``.
    ``shard_run``: write each output shard in a task of its own (batch/shard_merge.py: Ray or local processes).
    """
    started = time.perf_counter()
    adapter_paths = list(adapters)  # local paths once the sources are resolved below
    if not adapter_paths:
        raise LorafuseError("no adapter given: pass at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(adapter_paths)
    if len(weights) != len(adapter_paths):
        raise LorafuseError(f"{len(weights)} weights for {len(adapter_paths)} adapters: give one --weight per adapter")
    get_writer(out_format).check_available()  # an unknown format, or one that needs torch where it is missing
    gguf = out_format == "gguf" or Path(output).suffix == ".gguf"
    out_format = "gguf" if gguf else out_format
    if gguf:
        check_gguf_request(Path(output), outtype)
    weights = strengths(weights, "--weight")
    part_specs = part_weights_of(part_weights, len(adapter_paths))
    conv1d = parse_conv1d_modules(conv1d_modules)
    check_device(device)
    out_dtype = parse_merge_dtype(dtype)
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
    prefill_progress = PrefillProgress()
    inputs: list[AdapterInput] = []
    checkpoint = None
    try:
        # Again with the local paths the sources resolved to: what the final rename may replace is recorded here.
        checked = None if dry_run else check_output(output_path, overwrite, [base_path, *adapter_paths])
        if not dry_run and shard_run is None:  # the tasks write the shards: nothing to copy ahead on the driver
            prefill = start_prefill(
                base_path, output_path, max_shard, overwrite, adapter_paths, out_dtype, out_format, prefill_progress
            )
        pipe = open_pipeline(base_path) if is_pipeline(base_path) else None
        if pipe is not None:
            check_pipeline_request(output_path, out_format, gguf)
            checkpoint, prefix, conv1d = pipe.checkpoint, "", pipe.conv1d_modules(conv1d)
        else:
            checkpoint, prefix, _index = open_model(base_path)
        base_folder = base_path if base_path.is_dir() else None
        # a GGUF base describes itself (io/gguf_checkpoint.py)
        base_config = read_json(base_folder / "config.json") if base_folder else getattr(checkpoint, "config", None)
        if gguf:
            check_gguf_base(base_path, base_config, requant)
        elif base_path.suffix == ".gguf":
            raise LorafuseError(f"a GGUF base merges into a GGUF: give -o a path ending in .gguf, not {output_path}")
        base_shapes = {name: info.shape for name, info in checkpoint.infos.items()}
        for path, weight, label in zip(adapter_paths, weights, sources.labels):
            inputs.append(
                read_adapter(path, label=label, fmt=adapter_format, weight=float(weight), base_shapes=base_shapes)
            )
        set_part_weights(inputs, part_specs)
        plan = plan_merge(checkpoint, inputs, out_dtype, base_config, allow_unmatched, conv1d)
        single_file = (base_folder is None and output_path.suffix == ".safetensors") or gguf
        check_shard_run(shard_run, out_format, single_file, device, pipe is not None)
        report = MergeReport(
            base=str(base_path),
            adapters=[
                {"path": str(a), "weight": w, "format": inp.fmt, "files": {f.name: sha256_file(f) for f in inp.files}}
                | ({"parts": plan.parts[inp.label]} if inp.label in plan.parts else {})
                | ({"part_weights": recorded_part_weights(inp.part_weights)} if inp.part_weights else {})
                for a, w, inp in zip(adapter_paths, weights, inputs)
            ],
            output=str(output_path),
            dtype=short_name(out_dtype) if out_dtype is not None else "auto",
            format=out_format,
            tensors_total=len(plan.tensors),
            tensors_touched=sum(any(p.edit.adapter not in plan.idle for p in t.edits) for t in plan.touched),
            total_bytes=plan.total_bytes,
            files=[output_path.name]
            if single_file
            else pipe.files(plan, out_format, max_shard)
            if pipe is not None
            else get_writer(out_format).layout(output_slots(plan), prefix, max_shard).files,
            warnings=list(plan.warnings),
            config_updates=dict(plan.config_updates),
            dry_run=dry_run,
            sources=sources.provenance,
            engine="cuda" if device.startswith("cuda") else "numpy",
            idle_adapters=list(plan.idle),
            changes=changes_by_adapter(plan),
            allow_unmatched=allow_unmatched,
            conv1d_modules=None if conv1d is None else ",".join(sorted(conv1d)) or "none",
        )
        tokenizer = None
        if base_folder is not None and not single_file and pipe is None:
            tokenizer = _adapter_tokenizer(plan, dict(zip(sources.labels, adapter_paths)), base_folder, report)
        if dry_run:
            if pipe is not None:
                report.copied_files = pipe.copied_names()
            elif base_folder is not None and not single_file:
                report.copied_files = extra_file_names(
                    base_folder, checkpoint.files, {*report.files, PROVENANCE_NAME, CARD_NAME}
                )
            report_nonfinite(kernel.find_nonfinite(plan), report.warnings)
            report.seconds = time.perf_counter() - started
            return report
        assert checked is not None
        if gguf:
            with ByteBar(plan.total_bytes, "merging", show_progress) as bar:
                write_gguf(plan, report, base_folder, output_path, outtype, requant, device, bar.update, checked)
        elif pipe is not None:
            _write_pipeline(
                pipe, plan, report, output_path, max_shard, out_format, device, out_dtype, show_progress, checked
            )
        else:
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
                prefill_progress,
                shard_run,
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


def changes_by_adapter(plan: MergePlan) -> list[dict[str, Any]]:
    """What each adapter changes: one row per (adapter, edit kind) with the tensors it touches and their bytes."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for tensor in plan.touched:
        for key in dict.fromkeys((p.edit.adapter, p.edit.describe()["kind"]) for p in tensor.edits):
            row = rows.setdefault(key, {"adapter": key[0], "kind": key[1], "tensors": 0, "bytes": 0})
            row["tensors"] += 1
            row["bytes"] += tensor.nbytes
    return list(rows.values())


def _adapter_tokenizer(
    plan: MergePlan, paths: dict[str, Path], base_folder: Path, report: MergeReport
) -> TokenizerFiles | None:
    """The tokenizer files saved with an adapter that go into the merged model over the base's, with a warning
    saying so; None when the base's stay.

    A resized vocabulary takes the tokenizer of the last resizing adapter that has one. Otherwise an adapter's
    tokenizer (trainers save it, chat template included) is used when it differs from the base's; when several
    adapters hold different ones, which is meant is not known: the base's stay, with a warning. Links out of an
    adapter folder are refused here, before anything is written (io/extra_files.find_tokenizer).
    """
    found = {label: tok for label, path in paths.items() if (tok := find_tokenizer(path)) is not None}
    if plan.resized_by:
        for label in reversed(plan.resized_by):
            if label in found:
                return _use_tokenizer(found[label], label, "which resized the vocabulary", report)
        _warn(
            "the adapters resize the vocabulary but hold no tokenizer files: copy the tokenizer you trained with "
            "into the merged folder (the base's does not know the added tokens)",
            report,
        )
        return None
    base_tokenizer = find_tokenizer(base_folder) if found else None
    distinct: list[tuple[str, TokenizerFiles]] = []
    for label, tok in found.items():
        if tok.differs_from(base_tokenizer) and not any(tok.same_as(other) for _, other in distinct):
            distinct.append((label, tok))
    if len(distinct) > 1:
        _warn(
            f"the adapters {' and '.join(label for label, _ in distinct)} hold different tokenizer files, so the "
            f"merged model keeps the base's: copy the tokenizer you mean into {report.output}",
            report,
        )
        return None
    return _use_tokenizer(distinct[0][1], distinct[0][0], "saved with it", report) if distinct else None


def _use_tokenizer(tokenizer: TokenizerFiles, label: str, why: str, report: MergeReport) -> TokenizerFiles:
    names = ", ".join(tokenizer.files)
    _warn(f"the tokenizer files of {label} ({names}), {why}, replace the base's in the merged model", report)
    report.tokenizer_from = label
    return tokenizer


def _warn(message: str, report: MergeReport) -> None:
    log.warning(message)
    report.warnings.append(message)


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
    tokenizer: TokenizerFiles | None,
    checked: OutputState,
    prefill_progress: PrefillProgress | None = None,
    shard_run: ShardRun | None = None,
) -> None:
    """Write the merged model atomically: weights and index, then (a folder) the base's other files, config
    updates and provenance, or (one safetensors file) the base file's metadata and the provenance key.

    ``tokenizer``: an adapter's tokenizer files, which replace the base's. ``checked``: what :func:`check_output`
    found at the output (the only thing the final rename may replace). One bar of the output's bytes
    (progress.py; ``show_progress`` None: on a terminal only), the prefill's copy counted on it. ``shard_run``:
    the shards written by tasks (batch/shard_merge.py), the rest of the folder here.
    """
    bar = ByteBar(plan.total_bytes, "merging", show_progress)
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
            if shard_run is not None:
                sharded = write_sharded(plan, out.tmp, prefix, max_shard, shard_run, bar.update)
                written = WrittenModel(sharded.files, {}, plan.total_bytes, sharded.nonfinite)
                report.shard_sha256 = sharded.sha256
            else:
                written = write_model(
                    plan,
                    out.tmp,
                    prefix,
                    max_shard,
                    out_format,
                    device,
                    bar.update,
                    prefill=prefill,
                    prefill_progress=prefill_progress,
                )
            report_nonfinite(written.nonfinite, report.warnings)
            report.files = written.files
            finish_folder(out.tmp, report, base_folder, weight_files, plan.config_updates, out_dtype, tokenizer)
            out.commit()
    finally:
        bar.close()


def _write_pipeline(
    pipe: Pipeline,
    plan: MergePlan,
    report: MergeReport,
    output_path: Path,
    max_shard: int,
    out_format: str,
    device: str,
    out_dtype: np.dtype | None,
    show_progress: bool | None,
    checked: OutputState,
) -> None:
    """Write a merged diffusers pipeline folder atomically (pipeline.py lays it out; each component's weights go
    through :func:`write_model`), on one bar of the output's bytes."""
    with ByteBar(plan.total_bytes, "merging", show_progress) as bar:
        with AtomicOutput(output_path, checked=checked) as out:

            def component(part: MergePlan, folder: Path, prefix: str) -> WrittenModel:
                return write_model(part, folder, prefix, max_shard, out_format, device, bar.update)

            write_pipeline(pipe, plan, report, out.tmp, component, out_dtype)
            out.commit()
