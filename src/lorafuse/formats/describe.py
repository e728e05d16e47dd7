"""What a diffusion LoRA is, for ``inspect``: the layout its trainer wrote (kohya, LyCORIS, diffusers, old diffusers,
``diffusion_model``, XLabs), its algorithms (lora, locon, loha, lokr, dora, glora, oft, boft, full diff) and the
parts it targets (UNet/transformer, each text encoder) with their module counts.

Told from the names of the adapter's tensors (each edit's ``source_key``) and the edits the format read; an adapter
whose names belong to no diffusion part and no diffusion layout (a language-model LoRA) gets None.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..edits import Edit
from ..names.diffusers_old import is_old_key
from ..names.parts import KOHYA_RE, PART_NAMES, adapter_part
from ..plan import AdapterInput

# Edit kind (Edit.describe) -> the algorithm's usual name; LoRA on a conv layer is "locon" (kohya's, LyCORIS' name).
ALGORITHMS = {
    "lora": "lora",
    "dora": "dora",
    "loha": "loha",
    "lokr": "lokr",
    "glora": "glora",
    "lycoris-oft": "oft",
    "lycoris-boft": "boft",
    "diff": "full diff",
    "replace": "full diff",
}
DIFFUSION_MODEL = ("diffusion_model.", "model.diffusion_model.")


def layout_of_key(key: str, fmt: str) -> str | None:
    """The LoRA layout tensor name ``key`` is in (read as format ``fmt``), or None for no diffusion layout."""
    if fmt == "xlabs":
        return "XLabs"
    if key.startswith("lycoris_"):
        return "LyCORIS"
    if KOHYA_RE.match(key):
        return "kohya"
    if is_old_key(key):
        return "old diffusers"
    if key.startswith(DIFFUSION_MODEL):
        return "diffusion_model"
    if adapter_part(key) is not None:
        return "diffusers"
    return None


def algorithms_of(edit: Edit) -> list[str]:
    """The algorithm names of one edit (a LyCORIS DoRA edit: its inner update's and "dora")."""
    described = edit.describe()
    kind = described.get("kind")
    name = ALGORITHMS.get(kind)
    if name is None:
        return []
    if name == "lora" and described.get("layout") == "conv":
        name = "locon"
    return [name, "dora"] if described.get("dora") else [name]


def describe_diffusion(adapter: AdapterInput) -> dict[str, Any] | None:
    """``{"layouts": [...], "algorithms": [...], "parts": {part: modules}}`` for a diffusion LoRA, else None.

    Module counts are of the base modules (``.weight``/``.bias`` of one layer count once) per part; an edit whose
    name tells no part is counted under no part.
    """
    layouts: Counter[str] = Counter()
    algorithms: Counter[str] = Counter()
    modules: dict[str, set[str]] = {}
    for targeted in adapter.edits:
        key = targeted.edit.source_key or targeted.target
        layout = layout_of_key(key, adapter.fmt)
        part = adapter_part(key)
        if layout is None and part is None:
            continue
        if layout is not None:
            layouts[layout] += 1
        algorithms.update(algorithms_of(targeted.edit))
        if part is not None:
            modules.setdefault(part, set()).add(targeted.target.rpartition(".")[0] or targeted.target)
    if not layouts and not modules:
        return None
    order = list(PART_NAMES)
    return {
        "layouts": [name for name, _ in layouts.most_common()],
        "algorithms": [name for name, _ in algorithms.most_common()],
        "parts": {PART_NAMES[p]: len(modules[p]) for p in sorted(modules, key=order.index)},
    }


def render_diffusion(described: dict[str, Any]) -> str:
    """One line: ``kohya; lora, locon; UNet/transformer 79 modules, text encoder 1 72 modules``."""
    parts = ", ".join(f"{part} {count} modules" for part, count in described["parts"].items()) or "no part named"
    return f"{', '.join(described['layouts']) or '-'}; {', '.join(described['algorithms']) or '-'}; {parts}"
