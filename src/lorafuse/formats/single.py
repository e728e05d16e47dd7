"""Single-file adapters (``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``) and format detection by key names.

Pickled files are loaded weights-only and nested ``state_dict``/``model`` dicts are unwrapped (see
:func:`lorafuse.io.checkpoint.load_pickled_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import AdapterError, InputError
from ..io.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, Checkpoint

WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
PEFT_PREFIX = "base_model.model."
# kohya / sd-scripts module names: "lora_unet_down_blocks_0_..._to_q", one flat name without dots.
KOHYA_KEY_RE = re.compile(
    r"^lora_[A-Za-z0-9]+_[^.]+\.(lora_up\.weight|lora_down\.weight|alpha|dora_scale|diff(_b|_m)?)$"
)
DIFFUSION_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".diff", ".diff_b", ".diff_m")
PLAIN_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


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


def sniff_format(keys: Iterable[str]) -> str | None:
    """The adapter format its tensor names indicate: kohya, diffusion, plain or peft; None when unknown."""
    keys = list(keys)
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(KOHYA_KEY_RE.match(k) for k in keys):
        return "kohya"
    if any(k.endswith(DIFFUSION_SUFFIXES) for k in keys):
        return "diffusion"
    if any(k.endswith(PLAIN_SUFFIXES) for k in keys):
        return "plain"
    return None
