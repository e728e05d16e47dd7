"""diffusers' older LoRA layouts, mapped onto the modules they update, as diffusers' own loaders convert them
(``UNET_TO_DIFFUSERS``, ``DIFFUSERS_OLD_TO_PEFT``, ``DIFFUSERS_TO_PEFT`` and the ``.processor.`` it always drops, in
diffusers/utils/state_dict_utils.py):

- attention-processor LoRAs: ``...attn1.processor.to_q_lora.down.weight``; ``to_q/k/v/out_lora`` stand for the UNet's
  ``to_q``/``to_k``/``to_v``/``to_out.0`` and a text encoder's ``q_proj``/``k_proj``/``v_proj``/``out_proj``;
- ``LoRACompatibleLinear``/``Conv`` LoRAs: ``<module>.lora.down.weight``;
- ``<module>.lora_linear_layer.down.weight`` (text encoders' monkey-patched projections).

``up`` is lora_B, ``down`` lora_A. A name is a text encoder's when its prefix says so (``text_encoder.``).
"""

from __future__ import annotations

import re

from .parts import TEXT_ENCODERS, adapter_part

KEY_RE = re.compile(r"(_lora|\.lora|\.lora_linear_layer)\.(up|down)\.weight$")
SUFFIXES = {".up.weight": "up", ".down.weight": "down"}
PROCESSOR_RE = re.compile(r"^(?P<attention>.+)\.to_(?P<projection>q|k|v|out)_lora$")
UNET_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
TEXT_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
WRAPPERS = (".lora_linear_layer", ".lora")


def is_old_key(key: str) -> bool:
    """Whether tensor name ``key`` is in one of the older layouts."""
    return KEY_RE.search(key) is not None


def module_of(name: str) -> str | None:
    """The dotted module that older-layout LoRA module ``name`` (the key without ``.up/.down.weight``) updates;
    None when ``name`` is in none of the layouts."""
    name = name.replace(".processor.", ".")
    match = PROCESSOR_RE.match(name)
    if match:
        projections = TEXT_PROJECTIONS if adapter_part(name) in TEXT_ENCODERS else UNET_PROJECTIONS
        return f"{match['attention']}.{projections[match['projection']]}"
    wrapper = next((w for w in WRAPPERS if name.endswith(w)), None)
    return name[: -len(wrapper)] if wrapper else None
