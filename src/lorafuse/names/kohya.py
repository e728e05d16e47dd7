"""kohya / sd-scripts flattened module names mapped onto a base model's dotted names.

Names such as ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` flatten a module path with
underscores, which cannot be undone from the name alone (``down_blocks`` holds an underscore too). They are
mapped onto the base model by flattening the base's own module names the same way: a name matches a base module
whose flattened path equals it, or ends with it at a component boundary (the base may carry a head prefix such
as ``unet.`` or ``model.diffusion_model.``), and only onto a module of the part its prefix names (``lora_te2_``: text
encoder 2, see :mod:`.parts`). No match, or several, is an error naming the key.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

from ..errors import AdapterError
from .parts import TEXT_ENCODERS, adapter_part, base_part, may_land

PREFIX_RE = re.compile(r"^(?:lora_(?P<part>[A-Za-z]+\d*)|lycoris)_(?P<rest>.+)$")
# What lorafuse writes: kohya's UNet prefix before the flattened module path.
WRITE_PREFIX = "lora_unet_"
# sd-scripts names CLIP text-encoder modules through transformers 4's CLIPTextModel.text_model; transformers 5
# saves the same modules without that component.
CLIP_WRAPPER = "text_model_"


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
        rest = match["rest"] if match else name
        # Only another part's modules would match a name of the wrong part (lora_te2_* on text encoder 1's).
        part = adapter_part(name)

        def landing(flat: str) -> list[tuple[str, tuple[str, ...]]]:
            return [c for c in self._index.get(flat, []) if may_land(part, base_part(c[0]))]

        candidates = landing(rest) or landing(name)
        # checked after the part filter: another text encoder may keep the wrapper this one's file drops
        if not candidates and part in TEXT_ENCODERS and rest.startswith(CLIP_WRAPPER):
            candidates = landing(rest[len(CLIP_WRAPPER) :])
        modules = sorted({m for m, _lead in candidates})
        if len(modules) > 1:
            exact = sorted({m for m, lead in candidates if not lead})
            same_part = sorted({m for m, _lead in candidates if part is not None and base_part(m) == part})
            modules = same_part if len(same_part) == 1 else exact if len(exact) == 1 else modules
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


def flatten(module: str) -> str:
    """The kohya name lorafuse writes for dotted base module ``module``."""
    return WRITE_PREFIX + module.replace(".", "_")
