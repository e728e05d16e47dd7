"""Plain ``lora_A``/``lora_B`` files without PEFT's ``base_model.model.`` prefix (diffusers-style).

``<module>.lora_A.weight`` (down) and ``<module>.lora_B.weight`` (up), with an optional ``<module>.alpha``
(scale alpha / rank; 1 without it). Head prefixes such as ``unet.`` or ``transformer.`` are matched onto the
base's names like any other prefix difference.
"""

from __future__ import annotations

from pathlib import Path

from ..io.checkpoint import Checkpoint
from ..names import Layout
from ..plan import AdapterInput
from .lowrank import LowRankAdapter, ShapeOf, read_lowrank
from .registry import AdapterFormat, ReadContext, register_format
from .single import keys_sniffer, read_single

SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}
SNIFF_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def read_plain(
    checkpoint: Checkpoint, label: str, layout: Layout | None = None, shape_of: ShapeOf | None = None
) -> LowRankAdapter:
    """Read a plain lora_A/lora_B file into edits targeting ``<module>.weight``."""
    del layout  # names are the base's own, up to the head prefix the plan matches
    return read_lowrank(checkpoint, label, SUFFIXES, shape_of=shape_of)


def read(path: Path, context: ReadContext) -> AdapterInput:
    """Read the plain lora_A/lora_B file at ``path``."""
    return read_single(path, context, "plain", read_plain)


FORMAT = register_format(
    AdapterFormat("plain", sniff=keys_sniffer(lambda key: key.endswith(SNIFF_SUFFIXES)), read=read, priority=30)
)
