"""diffusers pipeline folders as merge bases: ``model_index.json`` beside one folder per component (``unet/``,
``text_encoder/``, ``text_encoder_2/``, ``transformer/``, ``vae/``, ``scheduler/``, ``tokenizer/``...).

The merge stays the one pipeline of merger.py: the components that hold weights are opened as one checkpoint whose
tensor names carry the component (``unet.down_blocks.0...``, ``text_encoder.text_model...``), the names diffusers'
own pipeline LoRA files use and that names/parts.py tells parts by. So one plan resolves every LoRA name (kohya
``lora_unet_``/``lora_te1_``/``lora_te2_``, diffusers ``unet.``/``text_encoder_2.``) against every component, and
counts and checks the parts as for any other base. Writing splits that plan by component: each component's weights
go through the kernel into its own folder of the output (untouched ones copied file to file), then every other file
of the pipeline is copied (io/extra_files.py: its rules on links hold for each component folder), and one
``lorafuse_merge.json`` is written at the top. All of it inside one atomic output folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import short_name
from .conv1d import is_conv1d_model
from .errors import InputError, LorafuseError
from .io.checkpoint import Checkpoint
from .io.extra_files import copy_extra_files, extra_file_names, read_json, update_config
from .io.model_files import find_model_weights, real_path, shown
from .names.parts import DENOISER, TEXT_ENCODERS, base_part
from .plan import MergePlan, nonfinite_warning
from .report import PROVENANCE_NAME, MergeReport
from .writers import get_writer
from .writers.model_card import CARD_NAME, write_card
from .writers.provenance import write_provenance

log = logging.getLogger("lorafuse")

MODEL_INDEX = "model_index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Component:
    """One component of a pipeline that holds weights: its folder and weight files (as find_model_weights gives
    them) and its config.json."""

    name: str
    folder: Path
    files: list[Path]
    prefix: str
    config: dict[str, Any] | None
    index: Path | None = None


class PipelineCheckpoint(Checkpoint):
    """Every weight component's tensors as one checkpoint, each name led by its component (``unet.<name>``)."""

    def __init__(self, parts: dict[str, Checkpoint]):
        self.parts = parts
        self.files = [f for part in parts.values() for f in part.files]
        self.infos = {f"{comp}.{name}": info for comp, part in parts.items() for name, info in part.infos.items()}
        self.metadata = {}
        self._pickled = {}
        self._fds = {}

    def _local(self, name: str) -> tuple[Checkpoint, str]:
        comp, _, local = name.partition(".")
        return self.parts[comp], local

    @property
    def is_safetensors(self) -> bool:
        return all(part.is_safetensors for part in self.parts.values())

    def array(self, name: str) -> np.ndarray:
        part, local = self._local(name)
        return part.array(local)

    def elements(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        part, local = self._local(name)
        return part.elements(local, start, stop, out)

    def close(self) -> None:
        for part in self.parts.values():
            part.close()
        super().close()


@dataclass
class Pipeline:
    """A pipeline folder opened as a base: the components LoRAs target (the UNet or transformer, the text
    encoders) and their tensors as one checkpoint, and the other weight components (the VAE, image encoders...),
    copied as they are."""

    folder: Path
    components: list[Component]
    checkpoint: PipelineCheckpoint
    copied: list[Component]

    def conv1d_modules(self, given: frozenset[str] | None) -> frozenset[str] | None:
        """``--conv1d-modules`` for the plan: as given, else none when every component's config.json names a
        diffusers model or a transformers model without Conv1D layers (what orients square updates, conv1d.py);
        None (square updates refused) when one does not tell."""
        if given is not None:
            return given
        for comp in self.components:
            config = comp.config or {}
            diffusers = "_class_name" in config and "_diffusers_version" in config
            transformers = "model_type" in config and "auto_map" not in config and not is_conv1d_model(config)
            if not (diffusers or transformers):
                return None
        return frozenset()

    def split(self, plan: MergePlan) -> list[tuple[Component, MergePlan]]:
        """The plan of each component: its output tensors under their names in the component's own files."""
        plans = []
        for comp in self.components:
            lead = f"{comp.name}."
            tensors = [replace(t, name=t.name[len(lead) :]) for t in plan.tensors if t.source.startswith(lead)]
            scan = [name for name in plan.scan if name.startswith(lead)]
            plans.append((comp, replace(plan, tensors=tensors, scan=scan)))
        return plans

    def files(self, plan: MergePlan, out_format: str, max_shard: int) -> list[str]:
        """The weight files the merged pipeline holds, relative to its folder."""
        from .merger import output_slots

        writer = get_writer(out_format)
        merged = [
            f"{comp.name}/{name}"
            for comp, part in self.split(plan)
            for name in writer.layout(output_slots(part), comp.prefix, max_shard).files
        ]
        return merged + [f"{comp.name}/{f.name}" for comp in self.copied for f in _whole(comp)]

    def copied_names(self) -> list[str]:
        """The top-level names of the other files copied (a dry run's list; their links checked as when copying)."""
        names = {comp.name for comp in (*self.components, *self.copied)}
        for comp in (*self.components, *self.copied):
            extra_file_names(comp.folder, comp.files, set())
        rest = extra_file_names(self.folder, [], {PROVENANCE_NAME, CARD_NAME, *names})
        return sorted({*names, *rest})


def _whole(comp: Component) -> list[Path]:
    """A copied component's weight files and their index."""
    return [*comp.files, *([comp.index] if comp.index is not None else [])]


def is_pipeline(path: Path) -> bool:
    """True for a diffusers pipeline folder: ``model_index.json`` and no weight files of its own at the top."""
    path = Path(path)
    if not path.is_dir() or not (path / MODEL_INDEX).is_file():
        return False
    return not any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in path.iterdir())


def _holds_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir())


def open_pipeline(folder: Path) -> Pipeline:
    """The components of pipeline ``folder`` that hold weights, as model_index.json names them, opened."""
    folder = Path(folder)
    index = read_json(folder / MODEL_INDEX)
    if not isinstance(index, dict):
        raise InputError(f"{shown(folder / MODEL_INDEX)} is not a JSON object: the pipeline folder is damaged")
    components: list[Component] = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or "." in name or "/" in name:
            continue  # _class_name, _diffusers_version, settings such as requires_safety_checker
        sub = folder / name
        if value[:1] == [None] or not sub.exists() and not sub.is_symlink():
            continue  # a component the pipeline leaves out (safety_checker: [null, null])
        real = real_path(sub, folder)  # a component folder linked out of the pipeline is refused
        if not real.is_dir() or not _holds_weights(sub):
            continue  # the scheduler, tokenizers, feature extractors: copied as they are
        files, prefix, weight_index = find_model_weights(sub)
        components.append(Component(name, sub, files, prefix, read_json(sub / "config.json"), weight_index))
    # Only the parts LoRAs train go into the plan: a VAE's names (down_blocks.0.resnets...) repeat the UNet's, and
    # no LoRA layout targets it.
    copied = [c for c in components if base_part(f"{c.name}.") not in (DENOISER, *TEXT_ENCODERS)]
    components = [c for c in components if c not in copied]
    if not components:
        raise InputError(
            f"the pipeline folder {shown(folder)} has no UNet, transformer or text encoder that holds weights "
            f"(model_index.json names {', '.join(k for k in index if not k.startswith('_')) or 'none'}): download "
            "their weights too"
        )
    parts: dict[str, Checkpoint] = {}
    try:
        for comp in components:
            parts[comp.name] = Checkpoint(comp.files)
    except BaseException:
        for part in parts.values():
            part.close()
        raise
    return Pipeline(folder, components, PipelineCheckpoint(parts), copied)


def check_request(output: Path, out_format: str, gguf: bool) -> None:
    """Refuse outputs a pipeline cannot be written as: one file, GGUF."""
    if gguf or output.suffix in (".safetensors", ".gguf") or out_format == "gguf":
        raise LorafuseError(
            f"a diffusers pipeline folder merges into a pipeline folder: give -o a folder, not {shown(output)}"
        )


def write_pipeline(
    pipe: Pipeline,
    plan: MergePlan,
    report: MergeReport,
    folder: Path,
    write_component: Any,
    out_dtype: np.dtype | None,
) -> None:
    """Write the merged pipeline into ``folder`` (the atomic output's temporary): each component's weights through
    ``write_component(plan, folder, prefix)`` (merger.write_model with the merge's settings; returns what it wrote),
    then the other files, dtype notes in transformers configs, the card and the provenance (with the warning for
    untouched tensors that hold NaN/Inf)."""
    if plan.config_updates:  # none arises for diffusion components; a component's config.json is not guessed
        raise LorafuseError(
            f"this merge changes config.json ({', '.join(plan.config_updates)}), which lorafuse does not do inside a "
            f"pipeline folder: merge into the component folder ({', '.join(c.name for c in pipe.components)}) alone"
        )
    every = [*pipe.components, *pipe.copied]
    for comp in every:  # links refused before the first byte is written
        extra_file_names(comp.folder, comp.files, set())
    extra_file_names(pipe.folder, [], {PROVENANCE_NAME, CARD_NAME, *(c.name for c in every)})
    report.files = []
    nonfinite: list[str] = []
    for comp, part in pipe.split(plan):
        dest = folder / comp.name
        dest.mkdir()
        written = write_component(part, dest, comp.prefix)
        nonfinite.extend(f"{comp.name}.{name}" for name in written.nonfinite)
        report.files.extend(f"{comp.name}/{name}" for name in written.files)
        copy_extra_files(comp.folder, dest, comp.files, set(), warnings=report.warnings)
        config = read_json(dest / "config.json") or {}
        if out_dtype is not None and "model_type" in config:  # transformers records the dtype; diffusers does not
            update_config(
                dest / "config.json", {"dtype" if "dtype" in config else "torch_dtype": short_name(out_dtype)}
            )
    for comp in pipe.copied:
        dest = folder / comp.name
        dest.mkdir()
        for path in _whole(comp):  # the files themselves (find_model_weights checked their links)
            shutil.copyfile(os.path.realpath(path), dest / path.name)
            report.files.append(f"{comp.name}/{path.name}")
        copy_extra_files(comp.folder, dest, comp.files, set(), warnings=report.warnings)
    top = copy_extra_files(pipe.folder, folder, [], {PROVENANCE_NAME}, warnings=report.warnings)
    report.copied_files = sorted({*(c.name for c in every), *(n for n in top if n != CARD_NAME)})
    warning = nonfinite_warning(nonfinite)
    if warning is not None:
        log.warning(warning)
        report.warnings.append(warning)
    write_card(folder, report)
    write_provenance(folder, report)
