"""Plain ``lora_A``/``lora_B`` files without PEFT's ``base_model.model.`` prefix (diffusers-style).

``<module>.lora_A.weight`` (down) and ``<module>.lora_B.weight`` (up), with an optional ``<module>.alpha``
(scale alpha / rank; 1 without it). Head prefixes such as ``unet.`` or ``transformer.`` are matched onto the
base's names like any other prefix difference.
"""

from __future__ import annotations

from ..io.checkpoint import Checkpoint
from .lowrank import LowRankAdapter, ShapeOf, read_lowrank

SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}


def read_plain(checkpoint: Checkpoint, label: str, shape_of: ShapeOf | None = None) -> LowRankAdapter:
    """Read a plain lora_A/lora_B file into edits targeting ``<module>.weight``."""
    return read_lowrank(checkpoint, label, SUFFIXES, shape_of=shape_of)
