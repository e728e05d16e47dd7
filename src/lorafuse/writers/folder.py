"""Everything a merged model folder holds besides its weights: the base's other files (io/extra_files.py, their
links checked before the first copy), the tokenizer saved with an adapter (over the base's), config updates, the
model card (model_card.py, over the base's) and the provenance file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import short_name
from ..io.extra_files import TokenizerFiles, copy_extra_files, install_tokenizer, read_json, update_config
from ..report import PROVENANCE_NAME, MergeReport
from .model_card import CARD_NAME, write_card
from .provenance import write_provenance


def finish_folder(
    folder: Path,
    report: MergeReport,
    base_folder: Path | None,
    weight_files: list[Path],
    config_updates: dict[str, Any],
    out_dtype: np.dtype | None = None,
    tokenizer: TokenizerFiles | None = None,
) -> None:
    """Complete the output ``folder`` (a temporary, renamed into place afterwards) around its weights.

    ``weight_files``: the base's weight files (not copied: the merged ones replace them); ``tokenizer``: an
    adapter's tokenizer files, which replace the base's (links already checked); ``out_dtype``: recorded in
    ``config.json`` when the merge changed the dtype.
    """
    if base_folder is not None:
        copied = copy_extra_files(base_folder, folder, weight_files, {PROVENANCE_NAME}, warnings=report.warnings)
        report.copied_files = [name for name in copied if name != CARD_NAME]  # the card is written, not copied
        if tokenizer is not None:
            names = install_tokenizer(tokenizer, folder)
            report.copied_files = sorted(set(report.copied_files) | set(names))
        updates = dict(config_updates)
        if out_dtype is not None:
            # transformers 5 writes "dtype", older versions "torch_dtype".
            key = "dtype" if "dtype" in (read_json(folder / "config.json") or {}) else "torch_dtype"
            updates[key] = short_name(out_dtype)
        update_config(folder / "config.json", updates)
    # After the base's files (its README.md gives the card its metadata header), before the provenance.
    write_card(folder, report)
    write_provenance(folder, report)
