"""All inputs of one merge resolved to local paths, with the base taken from the adapter when not given."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LorafuseError
from .adapter_config import base_named_by
from .resolve import fetch, fetch_adapter
from .spec import parse_source

log = logging.getLogger("lorafuse")


class LazyWorkDir:
    """A work folder made on first use: the caller's folder, or a temporary one that :meth:`cleanup` removes."""

    def __init__(self, given: str | Path | None = None):
        self.given = Path(given) if given is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __call__(self) -> Path:
        if self.given is not None:
            self.given.mkdir(parents=True, exist_ok=True)
            return self.given
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lorafuse-work-")
        return Path(self._tmp.name)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@dataclass
class MergeInputs:
    """Local paths for a merge. Call :meth:`cleanup` when done (removes a temporary work folder, if any)."""

    base: Path
    adapters: list[Path]
    labels: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    base_note: str | None = None
    work: LazyWorkDir | None = None

    def cleanup(self) -> None:
        if self.work is not None:
            self.work.cleanup()


def _per_adapter(value: Any, count: int, name: str) -> list[Any]:
    if value is None or isinstance(value, (str, Path, Mapping)):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise LorafuseError(f"{len(values)} values of {name} for {count} adapters: give one, or one per adapter")
    return values


def resolve_merge_inputs(
    base: str | Path | None,
    adapters: Sequence[str | Path],
    *,
    adapter_ref: str | Sequence[str | None] | None = None,
    adapter_subfolder: str | Sequence[str | None] | None = None,
    adapter_config: str | Path | Mapping[str, Any] | Sequence[Any] | None = None,
    cache_dir: str | Path | None = None,
    base_revision: str | None = None,
    work_dir: str | Path | None = None,
    adapter_format: str | None = None,
    default_hub: str = "hf",
) -> MergeInputs:
    """Resolve the base and every adapter of a merge to local paths (downloading and cloning as needed).

    Local inputs come back unchanged (the same relative or absolute ``Path``), so a merge of local folders
    behaves exactly as before. Without ``base``, the first adapter's ``adapter_config.json`` names it
    (``base_model_name_or_path`` and ``revision``). ``adapter_ref``, ``adapter_subfolder`` and ``adapter_config``
    take one value for all adapters or one per adapter. Git clones and generated adapter configs go to
    ``work_dir`` (``adapter_repo``, ``adapter``, ``adapter_1_repo`` ..., ``base_repo``; these must not exist yet),
    else to a temporary folder.
    """
    if not adapters:
        raise LorafuseError("no adapter given: pass at least one adapter")
    count = len(adapters)
    refs = _per_adapter(adapter_ref, count, "adapter_ref")
    subfolders = _per_adapter(adapter_subfolder, count, "adapter_subfolder")
    configs = _per_adapter(adapter_config, count, "adapter_config")
    work = LazyWorkDir(work_dir)
    try:
        adapter_paths: list[Path] = []
        labels: list[str] = []
        infos: list[dict[str, Any]] = []
        for i, (text, ref, sub, config) in enumerate(zip(adapters, refs, subfolders, configs)):
            resolved = fetch_adapter(
                text,
                ref=ref or None,
                subfolder=sub or None,
                config=config,
                cache_dir=cache_dir,
                work_dir=work,
                default_hub=default_hub,
                name="adapter" if i == 0 else f"adapter_{i}",
                peft=adapter_format in (None, "peft"),
            )
            adapter_paths.append(resolved.path)
            if "training_output" in resolved.info:
                labels.append(str(resolved.path))  # the checkpoint chosen in a training output folder
            elif resolved.source.kind == "local" and not resolved.source.revision:
                labels.append(str(Path(text) / sub) if sub else str(Path(text)))
            else:
                labels.append(resolved.source.describe() + (f" ({sub})" if sub else ""))
            infos.append(resolved.info)
        note = None
        if base is None:
            base, named_revision = base_named_by(adapter_paths[0])
            base_revision = base_revision or named_revision
            note = f"base model {base}" + (f" at revision {base_revision}" if base_revision else "")
            note += f", from base_model_name_or_path in the adapter_config.json of {labels[0]}"
            log.info(note)
        src = parse_source(base, default_hub, base_revision or None)
        base_res = fetch(src, role="model", cache_dir=cache_dir, work_dir=work, clone_name="base_repo")
    except BaseException:
        work.cleanup()
        raise
    if note:
        base_res.info["chosen_from_adapter"] = labels[0]
    return MergeInputs(base_res.path, adapter_paths, labels, {"base": base_res.info, "adapters": infos}, note, work)
