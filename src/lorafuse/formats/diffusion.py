"""The ``diffusion_model.``-prefixed layout (LightX2V's extractor, ComfyUI-style loaders).

``diffusion_model.<key>.lora_up.weight`` / ``.lora_down.weight`` or ``.lora_B.weight`` / ``.lora_A.weight``
(optional ``.alpha``; scale 1 without it) add up @ down to ``<key>.weight``; full differences ``.diff``, ``.diff_b``
and ``.diff_m`` are added to ``<key>.weight``, ``<key>.bias`` and ``<key>.modulation``; the LyCORIS algorithms
(:mod:`.lycoris`) are read too. The
``diffusion_model.`` prefix is matched like any other head prefix, so the same file merges into a checkpoint whose
names carry it or not. ``lorafuse extract --format diffusion`` writes it.
"""

from __future__ import annotations

from pathlib import Path

from ..io.checkpoint import Checkpoint
from ..names import Layout
from ..plan import AdapterInput
from . import lycoris
from .lowrank import UP_DOWN_DIFF_SUFFIXES, LowRankAdapter, ShapeOf, read_lowrank
from .registry import AdapterFormat, ReadContext, StoredNames, register_format
from .single import diff_slot, keys_sniffer, read_single, write_single_file

PREFIX = "diffusion_model."
# lora_A/lora_B beside full differences: Wan distill / CausVid files mix them.
SUFFIXES = UP_DOWN_DIFF_SUFFIXES | {".lora_A.weight": "down", ".lora_B.weight": "up"} | lycoris.SUFFIXES
# Its own tensor names (its alphas alone would not tell it from other formats).
SNIFF_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".diff", ".diff_b", ".diff_m")
# LyCORIS' names, which kohya files hold too: this layout's only under its prefix.
LYCORIS_SUFFIXES = tuple(lycoris.SUFFIXES)


def read_diffusion(
    checkpoint: Checkpoint, label: str, layout: Layout | None = None, shape_of: ShapeOf | None = None
) -> LowRankAdapter:
    """Read a diffusion-layout adapter file into edits targeting ``<key>.weight``/``.bias``/``.modulation``."""
    del layout  # names are the base's own, up to the head prefix the plan matches
    return read_lowrank(checkpoint, label, SUFFIXES, shape_of=shape_of)


def read(path: Path, context: ReadContext) -> AdapterInput:
    """Read the diffusion-layout file at ``path``."""
    return read_single(path, context, "diffusion", read_diffusion)


def lora_names(module: str) -> tuple[str, str, str | None]:
    """The (up, down, alpha) names lorafuse writes for ``module``: no alpha, so the scale is 1."""
    return f"{PREFIX}{module}.lora_up.weight", f"{PREFIX}{module}.lora_down.weight", None


def diff_name(name: str) -> str | None:
    """The name lorafuse writes for base tensor ``name``'s full difference."""
    parts = diff_slot(name)
    return f"{PREFIX}{parts[0]}.{parts[1]}" if parts else None


FORMAT = register_format(
    AdapterFormat(
        "diffusion",
        sniff=keys_sniffer(
            lambda key: key.endswith(SNIFF_SUFFIXES) or (key.startswith(PREFIX) and key.endswith(LYCORIS_SUFFIXES))
        ),
        read=read,
        write=write_single_file,
        names=StoredNames("diffusion", lora_names, diff_name),
        priority=20,
    )
)
