"""Single-file adapters (``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``): finding, sniffing and reading them.

Pickled files are loaded weights-only and nested ``state_dict``/``model`` dicts are unwrapped (see
:func:`lorafuse.io.checkpoint.load_pickled_state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterError, InputError
from ..io.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, Checkpoint
from ..io.output import AtomicOutput, OutputState, check_output
from ..names import Layout
from ..plan import AdapterInput
from .lowrank import DIFF_TARGETS, LowRankAdapter, ShapeOf
from .peft_writer import write_safetensors
from .registry import ReadContext

WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
PEFT_PREFIX = "base_model.model."
# base tensor attribute -> the slot of its full difference (``.diff``, ``.diff_b``, ``.diff_m``)
DIFF_SLOTS = {attr: slot for slot, attr in DIFF_TARGETS.items()}
SingleReader = Callable[[Checkpoint, str, "Layout | None", ShapeOf], LowRankAdapter]


def adapter_file(path: Path) -> Path:
    """The weight file of a single-file adapter: ``path`` itself, or the only weight file in folder ``path``."""
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise InputError(f"{path} is not a weight file: use a .safetensors, .pt, .pth, .bin or .ckpt adapter")
        return path
    if not path.is_dir():
        raise InputError(f"adapter {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "no weight file"
        raise AdapterError(f"adapter folder {path} must hold exactly one weight file (found {found}): pass the file")
    return files[0]


def open_adapter(path: Path) -> Checkpoint:
    """Open a single-file adapter lazily (safetensors) or weights-only (pickles)."""
    return Checkpoint([adapter_file(path)])


def adapter_keys(path: Path) -> tuple[str, ...]:
    """The tensor names of the single-file adapter at ``path`` (each format's ``sniff`` looks at them)."""
    file = adapter_file(path)
    stat = file.stat()
    return _keys(str(file), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _keys(file: str, _ino: int, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    # Detection asks every format in turn: open the file once (a pickle is loaded whole), not once per format.
    checkpoint = Checkpoint([Path(file)])
    try:
        return tuple(checkpoint.keys())
    finally:
        checkpoint.close()


def keys_sniffer(matches: Callable[[str], bool]) -> Callable[[Path], bool]:
    """A ``sniff`` for a single-file format: the path is a weight file (or a folder of one) with a tensor name
    ``matches`` accepts, and no PEFT name (a PEFT adapter without its config is refused by the PEFT format)."""

    def sniff(path: Path) -> bool:
        if not Path(path).exists():
            return False
        keys = adapter_keys(path)
        return not any(k.startswith(PEFT_PREFIX) for k in keys) and any(matches(k) for k in keys)

    return sniff


def read_single(path: Path, context: ReadContext, fmt: str, reader: SingleReader) -> AdapterInput:
    """Read the single-file adapter at ``path`` with ``reader(checkpoint, label, layout, shape_of)``."""
    checkpoint = open_adapter(path)
    adapter = reader(checkpoint, context.label, context.layout, context.shape_of)
    return AdapterInput(
        label=context.label,
        edits=adapter.edits,
        weight=context.weight,
        modules=adapter.modules,
        files=[adapter_file(path)],
        fmt=fmt,
    )


def diff_slot(name: str) -> tuple[str, str] | None:
    """(module, diff slot) for base tensor ``name`` when a single-file format can hold its full difference."""
    module, _, attr = name.rpartition(".")
    slot = DIFF_SLOTS.get(attr)
    return (module, slot) if (slot is not None and module) else None


def write_single_file(
    output: str | Path,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
    checked: OutputState | None = None,
) -> Path:
    """Write ``tensors`` (named as the format stores them) to the single ``.safetensors`` file ``output``
    atomically; ``config`` is unused (single-file formats carry no config). Refuses an existing output unless
    ``overwrite``, as :func:`~lorafuse.formats.peft_writer.write_peft_adapter` does."""
    del config
    output = Path(output)
    if checked is None:
        checked = check_output(output, overwrite, list(inputs))
    with AtomicOutput(output, is_dir=False, checked=checked) as out:
        write_safetensors(out.tmp, tensors)
        out.commit()
    return output
