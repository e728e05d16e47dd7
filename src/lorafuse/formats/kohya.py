"""kohya / sd-scripts LoRA files: ``<name>.lora_up.weight``, ``<name>.lora_down.weight``, optional ``<name>.alpha``
(and LyCORIS-style full differences ``<name>.diff``/``.diff_b``/``.diff_m``, and the LyCORIS algorithms of
:mod:`.lycoris`: LoCon's ``lora_mid``, LoHa, LoKr, ``dora_scale``, ``w_norm``), with kohya's flattened module names
(``lora_unet_down_blocks_0_..._to_q``) mapped onto the base by the base layout's kohya name map
(:mod:`lorafuse.names.kohya`). ``lorafuse extract --format kohya`` writes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..names import Layout
from ..names.kohya import flatten
from ..plan import AdapterInput
from . import lycoris
from .lowrank import UP_DOWN_DIFF_SUFFIXES, LowRankAdapter, ShapeOf, read_lowrank
from .registry import AdapterFormat, ReadContext, StoredNames, register_format
from .single import diff_slot, keys_sniffer, read_single, write_single_file

# kohya files use the same up/down/alpha names, plus LyCORIS-style full differences (what
# `lorafuse extract --format kohya` writes for small tensors), as the diffusion layout, and LyCORIS' algorithms.
SUFFIXES = UP_DOWN_DIFF_SUFFIXES | lycoris.SUFFIXES
# kohya / sd-scripts / LyCORIS module names: "lora_unet_down_blocks_0_..._to_q", "lycoris_...": one flat name.
KEY_RE = re.compile(
    r"^(lora_[A-Za-z0-9]+_|lycoris_)[^.]+("
    + "|".join(re.escape(suffix) for suffix in sorted(SUFFIXES | lycoris.UNSUPPORTED, key=len, reverse=True))
    + ")$"
)


def read_kohya(
    checkpoint: Checkpoint, label: str, layout: Layout | None, shape_of: ShapeOf | None = None
) -> LowRankAdapter:
    """Read a kohya LoRA file into edits targeting the base's own tensor names."""
    if layout is None:
        raise AdapterError(
            f"{checkpoint.files[0]}: kohya LoRA names are resolved against the base model's tensor names; "
            "read it together with the base model (lorafuse merge BASE ADAPTER)"
        )
    return read_lowrank(checkpoint, label, SUFFIXES, resolve=layout.kohya.resolve, shape_of=shape_of)


def read(path: Path, context: ReadContext) -> AdapterInput:
    """Read the kohya file at ``path`` (its names resolved against ``context``'s base)."""
    return read_single(path, context, "kohya", read_kohya)


def lora_names(module: str) -> tuple[str, str, str | None]:
    """The (up, down, alpha) names lorafuse writes for dotted base module ``module``."""
    flat = flatten(module)
    return f"{flat}.lora_up.weight", f"{flat}.lora_down.weight", f"{flat}.alpha"


def diff_name(name: str) -> str | None:
    """The name lorafuse writes for base tensor ``name``'s full difference."""
    parts = diff_slot(name)
    return f"{flatten(parts[0])}.{parts[1]}" if parts else None


FORMAT = register_format(
    AdapterFormat(
        "kohya",
        sniff=keys_sniffer(KEY_RE.match),  # type: ignore[arg-type]
        read=read,
        write=write_single_file,
        names=StoredNames("kohya", lora_names, diff_name),
        priority=10,
    )
)
