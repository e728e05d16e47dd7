"""The one writer of PEFT adapters: numpy arrays + a PEFT config -> ``adapter_model.safetensors`` and
``adapter_config.json`` in a folder, written atomically. extract, combine and ``runtime.save_adapter`` write
through it.

The weights file holds the bytes PEFT's ``save_pretrained`` writes (safetensors' ``save_file`` with metadata
``{"format": "pt"}``): tensors ordered by dtype, widest first, then by name; the header compact JSON padded to
8 bytes. Any dtype numpy holds through ml_dtypes (bf16, fp8) is written; ``safetensors.numpy`` cannot hold bf16.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import arrays
from ..errors import LorafuseError
from ..io.layout import Slot, safetensors_header
from ..io.output import AtomicOutput, OutputState, check_output
from ..io.writer import array_bytes
from ..peft_flags import CONFIG_NAME

WEIGHTS_NAME = "adapter_model.safetensors"
# safetensors' Dtype enum, in order: it serializes tensors by this rank, highest first, then by name
# (measured with safetensors 0.8.0; tests/test_peft_writer.py compares the bytes with safetensors' own).
SAFETENSORS_DTYPE_ORDER = "BOOL U8 I8 F8_E5M2 F8_E4M3 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64".split()
SAFETENSORS_DTYPE_RANK = {code: rank for rank, code in enumerate(SAFETENSORS_DTYPE_ORDER)}


def _code(name: str, array: np.ndarray) -> str:
    try:
        return arrays.code_of(array.dtype)
    except KeyError:  # big-endian arrays too: their bytes would be read back wrong
        raise LorafuseError(f"cannot write tensor {name!r}: safetensors has no dtype {array.dtype.str}") from None


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` to the safetensors file ``path`` as safetensors' ``save_file(tensors, path,
    metadata={"format": "pt"})`` would.

    The arrays may be memory maps (a spool file): each is written from its own memory, one at a time.
    """
    slots = [Slot(name, _code(name, array), tuple(array.shape), array.nbytes) for name, array in tensors.items()]
    slots.sort(key=lambda s: (-SAFETENSORS_DTYPE_RANK[s.dtype], s.name))
    with open(path, "wb") as out:  # no fsync, as save_pretrained
        out.write(safetensors_header(slots))
        for slot in slots:
            out.write(array_bytes(tensors[slot.name]))


def write_adapter_files(folder: Path, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> list[str]:
    """Write ``adapter_config.json`` (``config`` in its own key order) and ``adapter_model.safetensors`` into the
    existing ``folder`` (an :class:`AtomicOutput`'s temporary); returns the names of the files written."""
    folder = Path(folder)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(folder / WEIGHTS_NAME, tensors)
    return [CONFIG_NAME, WEIGHTS_NAME]


def write_peft_adapter(
    output: str | Path,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
    checked: OutputState | None = None,
) -> Path:
    """Write a PEFT adapter folder at ``output`` atomically and return its path.

    ``tensors`` are named as PEFT saves them (``base_model.model.<module>.lora_A.weight`` ...). The output is
    checked against ``inputs`` and refused when it exists and is not empty, unless ``overwrite``; pass
    ``checked`` (from :func:`check_output`) when the caller checked it before its work began.
    """
    output = Path(output)
    if checked is None:
        checked = check_output(output, overwrite, list(inputs))
    with AtomicOutput(output, checked=checked) as out:
        write_adapter_files(out.tmp, tensors, config)
        out.commit()
    return output
