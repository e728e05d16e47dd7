"""Everything a merged model folder holds besides its weights: the base's other files (io/extra_files.py, their
links checked before the first copy), a resizing adapter's tokenizer, config updates, the provenance file, and
the place for a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import short_name
from ..io.extra_files import copy_extra_files, copy_tokenizer, read_json, update_config
from ..report import PROVENANCE_NAME, MergeReport
from .provenance import write_provenance


def finish_folder(
    folder: Path,
    report: MergeReport,
    base_folder: Path | None,
    weight_files: list[Path],
    config_updates: dict[str, Any],
    out_dtype: np.dtype | None = None,
    tokenizer: Path | None = None,
) -> None:
    """Complete the output ``folder`` (a temporary, renamed into place afterwards) around its weights.

    ``weight_files``: the base's weight files (not copied: the merged ones replace them); ``tokenizer``: a folder
    whose tokenizer files replace the base's (the adapter that resized the vocabulary); ``out_dtype``: recorded in
    ``config.json`` when the merge changed the dtype.
    """
    if base_folder is not None:
        report.copied_files = copy_extra_files(
            base_folder, folder, weight_files, {PROVENANCE_NAME}, warnings=report.warnings
        )
        if tokenizer is not None:
            names = copy_tokenizer(tokenizer, folder)
            report.copied_files = sorted(set(report.copied_files) | set(names))
        updates = dict(config_updates)
        if out_dtype is not None:
            # transformers 5 writes "dtype", older versions "torch_dtype".
            key = "dtype" if "dtype" in (read_json(folder / "config.json") or {}) else "torch_dtype"
            updates[key] = short_name(out_dtype)
        update_config(folder / "config.json", updates)
    # The model card hook: a generated README.md (base, adapters, weights from ``report``) is written here, after
    # the base's files are copied (their README.md would otherwise replace it) and before the provenance.
    write_provenance(folder, report)
