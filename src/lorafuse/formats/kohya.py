"""kohya / sd-scripts LoRA files: ``<name>.lora_up.weight``, ``<name>.lora_down.weight``, optional ``<name>.alpha``
(and LyCORIS-style full differences ``<name>.diff``/``.diff_b``/``.diff_m``).

Names such as ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` flatten a module path with
underscores, which cannot be undone from the name alone (``down_blocks`` holds an underscore too). They are
mapped onto the base model by flattening the base's own module names the same way: a name matches a base module
whose flattened path equals it, or ends with it at a component boundary (the base may carry a head prefix such
as ``unet.`` or ``model.diffusion_model.``). No match, or several, is an error naming the key.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from .lowrank import UP_DOWN_DIFF_SUFFIXES, LowRankAdapter, ShapeOf, read_lowrank

# kohya files use the same up/down/alpha names, plus LyCORIS-style full differences (what
# `lorafuse extract --format kohya` writes for small tensors), as the diffusion layout.
SUFFIXES = UP_DOWN_DIFF_SUFFIXES
PREFIX_RE = re.compile(r"^lora_(?P<part>[A-Za-z]+\d*)_(?P<rest>.+)$")
# Which base component a kohya prefix points at, to tell apart e.g. the two text encoders of SDXL.
PART_HINTS = {
    "unet": ("unet", "diffusion_model"),
    "te": ("text_encoder", "cond_stage_model"),
    "te1": ("text_encoder",),
    "te2": ("text_encoder_2",),
    "te3": ("text_encoder_3",),
    "transformer": ("transformer",),
}


class KohyaNames:
    """Maps flattened kohya module names onto dotted base module names."""

    def __init__(self, base_keys: Iterable[str]):
        # flattened suffix -> [(module, leading components removed)]
        self._index: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
        for module in dict.fromkeys(key.rpartition(".")[0] for key in base_keys):
            if not module:
                continue
            parts = module.split(".")
            for i in range(len(parts)):
                self._index["_".join(parts[i:])].append((".".join(parts), tuple(parts[:i])))

    def resolve(self, name: str, key: str) -> str:
        """The dotted base module for kohya module ``name`` (``key`` names the tensor in errors); ``name`` itself
        when no base module matches."""
        match = PREFIX_RE.match(name)
        part, rest = (match["part"], match["rest"]) if match else ("", name)
        candidates = self._index.get(rest) or self._index.get(name) or []
        modules = sorted({m for m, _lead in candidates})
        if len(modules) > 1:
            exact = sorted({m for m, lead in candidates if not lead})
            hints = PART_HINTS.get(part, ())
            hinted = sorted({m for m, lead in candidates if any(h in lead for h in hints)})
            modules = exact if len(exact) == 1 else hinted if len(hinted) == 1 else modules
        if len(modules) == 1:
            return modules[0]
        if not modules:
            # Left to the plan, which refuses it naming the key, or skips it with --allow-unmatched (a text
            # encoder's LoRAs merged into a UNet alone). The undotted name matches no base tensor.
            return name
        raise AdapterError(
            f"kohya tensor {key!r} matches several base tensors ({', '.join(modules[:3])}); "
            "merge into a model folder that holds only the component the LoRA was trained for"
        )


def read_kohya(
    checkpoint: Checkpoint, label: str, base_keys: Iterable[str] | None, shape_of: ShapeOf | None = None
) -> LowRankAdapter:
    """Read a kohya LoRA file into edits targeting the base's own tensor names."""
    if base_keys is None:
        raise AdapterError(
            f"{checkpoint.files[0]}: kohya LoRA names are resolved against the base model's tensor names; "
            "read it together with the base model (lorafuse merge BASE ADAPTER)"
        )
    names = KohyaNames(base_keys)
    return read_lowrank(checkpoint, label, SUFFIXES, resolve=names.resolve, shape_of=shape_of)
