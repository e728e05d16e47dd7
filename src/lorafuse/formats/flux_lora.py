"""XLabs' Flux LoRA files: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (1: the image
stream, 2: the text stream) and ``single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight``, optionally under
``diffusion_model.``, with no alpha (scale 1, as diffusers loads them).

Each names a BFL module, except a single block's ``qkv_lora``: its update holds q, k and v (in equal thirds), which
are the first rows of BFL's ``linear1`` (the MLP's rows follow), so it becomes three updates named as diffusers'
``to_q``/``to_k``/``to_v``, each the rows of its third. The base's layout maps all of them onto a BFL checkpoint or
a diffusers folder (names/flux.py).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ..edits import LoraDelta, RowSlice, TargetedEdit
from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..names import Layout
from ..plan import AdapterInput
from .lowrank import LowRankAdapter, ShapeOf, read_lowrank
from .registry import AdapterFormat, ReadContext, register_format
from .single import keys_sniffer, read_single

SUFFIXES = {".down.weight": "down", ".up.weight": "up"}
KEY_RE = re.compile(
    r"^(?P<prefix>(?:diffusion_model\.)?)(?P<kind>double|single)_blocks\.(?P<n>\d+)\.processor\."
    r"(?P<proj>qkv|proj)_lora(?P<stream>[12]?)\.(?:down|up)\.weight$"
)
# (block kind, projection, stream) -> the BFL module, after the block's prefix
MODULES = {
    ("double", "qkv", "1"): "img_attn.qkv",
    ("double", "proj", "1"): "img_attn.proj",
    ("double", "qkv", "2"): "txt_attn.qkv",
    ("double", "proj", "2"): "txt_attn.proj",
    ("single", "proj", ""): "linear2",
}
SINGLE_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
SINGLE_QKV_TARGET = re.compile(r"^(?P<block>(?:.*\.)?single_transformer_blocks\.\d+)\.qkv\.weight$")


def _target(module: str, key: str) -> str:
    match = KEY_RE.match(key)
    found = (match["kind"], match["proj"], match["stream"]) if match else None
    if found == ("single", "qkv", ""):
        return f"{match['prefix']}single_transformer_blocks.{match['n']}.qkv"  # split below
    if found not in MODULES:
        raise AdapterError(f"{key!r} is not an XLabs Flux LoRA tensor (double_blocks.N.processor.qkv_lora1, ...)")
    return f"{match['prefix']}{match['kind']}_blocks.{match['n']}.{MODULES[found]}"


def _split_single_qkv(targeted: TargetedEdit) -> list[TargetedEdit]:
    """A single block's q, k, v update as three updates of a third of its rows each (diffusers splits it so)."""
    match = SINGLE_QKV_TARGET.match(targeted.target)
    if match is None:
        return [targeted]
    edit = targeted.edit
    rows = edit.B.shape[0] if isinstance(edit, LoraDelta) else 0
    if rows % 3 or rows == 0:
        raise AdapterError(f"{edit.source_key!r}: a q, k, v update of {rows} rows does not split into equal thirds")
    third, block = rows // 3, match["block"]
    return [
        replace(targeted, target=f"{block}.{name}.weight", edit=RowSlice(edit, i * third, (i + 1) * third, rows))
        for i, name in enumerate(SINGLE_QKV)
    ]


def read_xlabs(
    checkpoint: Checkpoint, label: str, layout: Layout | None = None, shape_of: ShapeOf | None = None
) -> LowRankAdapter:
    """Read an XLabs Flux LoRA file into edits named as BFL (or, for single blocks' q, k, v, diffusers) names."""
    del layout  # the plan maps the names onto the base's layout
    read = read_lowrank(checkpoint, label, SUFFIXES, resolve=_target, shape_of=shape_of)
    return LowRankAdapter([part for edit in read.edits for part in _split_single_qkv(edit)], read.modules)


def read(path: Path, context: ReadContext) -> AdapterInput:
    """Read the XLabs Flux LoRA file at ``path``."""
    return read_single(path, context, "xlabs", read_xlabs)


FORMAT = register_format(
    AdapterFormat("xlabs", sniff=keys_sniffer(lambda key: KEY_RE.match(key) is not None), read=read, priority=15)
)
