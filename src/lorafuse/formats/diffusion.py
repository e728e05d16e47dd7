"""The ``diffusion_model.``-prefixed layout (LightX2V's extractor, ComfyUI-style loaders).

``diffusion_model.<key>.lora_up.weight`` / ``.lora_down.weight`` (optional ``.alpha``; scale 1 without it) add
up @ down to ``<key>.weight``; full differences ``.diff``, ``.diff_b`` and ``.diff_m`` are added to ``<key>.weight``,
``<key>.bias`` and ``<key>.modulation``. The ``diffusion_model.`` prefix is matched like any other head prefix, so
the same file merges into a checkpoint whose names carry it or not.
"""

from __future__ import annotations

from ..io.checkpoint import Checkpoint
from .lowrank import UP_DOWN_DIFF_SUFFIXES, LowRankAdapter, ShapeOf, read_lowrank

PREFIX = "diffusion_model."
SUFFIXES = UP_DOWN_DIFF_SUFFIXES


def read_diffusion(checkpoint: Checkpoint, label: str, shape_of: ShapeOf | None = None) -> LowRankAdapter:
    """Read a diffusion-layout adapter file into edits targeting ``<key>.weight``/``.bias``/``.modulation``."""
    return read_lowrank(checkpoint, label, SUFFIXES, shape_of=shape_of)
