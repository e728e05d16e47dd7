"""Name tables between the two layouts one model family is saved in (a model's original single-file checkpoint and
its diffusers folder), and the translation of adapter targets from one onto the other.

A table is data: each :class:`Pairing` pairs a module of the original layout with the diffusers module(s) whose
rows it holds, in row order (Flux's fused ``qkv`` holds ``to_q``, ``to_k``, ``to_v``). A :class:`Piece` may be part
of a diffusers module: the final adaLN linear of Flux stores (shift, scale) where diffusers stores (scale, shift),
so each half of one is the other half of the other. Names are templates, ``{n}`` standing for a block number.

:class:`PairedNames` turns an adapter's target named in the other layout into targets of the base's layout: a
renamed target, a row range of a fused base tensor (``TargetedEdit.rows``), or, the other way, the rows of a fused
update that a separate base tensor takes (:class:`~lorafuse.edits.RowSlice`). kohya's flattened module names
(``lora_unet_double_blocks_0_img_attn_qkv``) are matched as well. A target of neither layout is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from ..edits import RowSlice, TargetedEdit
from ..errors import ShapeMismatchError

ORIGINAL, DIFFUSERS = "original", "diffusers"
Side = Literal["original", "diffusers"]
BLOCK = "{n}"
PLAIN_ATTRS = (("weight", "weight"), ("bias", "bias"))
KOHYA_HEAD = re.compile(r"^(?:lora_[A-Za-z]+\d*_|lycoris_)")


@dataclass(frozen=True)
class Piece:
    """Rows ``part`` of ``of`` equal parts of the diffusers module ``module`` (all of it by default)."""

    module: str
    part: int = 0
    of: int = 1


@dataclass(frozen=True)
class Pairing:
    """An original module and the diffusers pieces stacked in its rows, in order.

    ``split``: how the original module's rows divide among the pieces: ``equal`` parts, or ``width`` (each piece
    but the last has as many rows as the weight has columns, the last the rest: Flux's ``linear1`` holds q, k, v of
    the hidden size, then the MLP). ``attrs``: (original, diffusers) tensor names of the module that correspond.
    """

    original: str
    pieces: tuple[Piece, ...]
    split: Literal["equal", "width"] = "equal"
    attrs: tuple[tuple[str, str], ...] = PLAIN_ATTRS

    @property
    def fused(self) -> bool:
        return len(self.pieces) > 1 or self.pieces[0].of > 1


def pair(
    original: str,
    *diffusers: str,
    split: Literal["equal", "width"] = "equal",
    attrs: tuple[tuple[str, str], ...] = PLAIN_ATTRS,
) -> Pairing:
    """A pairing of ``original`` with whole diffusers modules ``diffusers``, stacked in that order."""
    return Pairing(original, tuple(Piece(m) for m in diffusers), split, attrs)


def _pattern(template: str, sep: str) -> re.Pattern[str]:
    text = re.escape(template.replace(".", sep)).replace(re.escape(BLOCK), r"(?P<n>\d+)")
    return re.compile(text)


def _join(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


@dataclass(frozen=True)
class _Rule:
    pairing: Pairing
    module: str  # the template this rule matches, in the adapter's (the other) layout
    dotted: re.Pattern[str]
    flat: re.Pattern[str]
    attrs: dict[str, str]  # the adapter's tensor name -> the base's


class PairedNames:
    """Translates adapter targets named in the other layout of ``pairings`` onto a base in layout ``base_side``.

    ``resolve`` maps a name of the base's layout onto the base tensor (head prefixes differ), ``shapes`` gives the
    base tensors' shapes, which size the rows of fused tensors.
    """

    def __init__(
        self,
        pairings: tuple[Pairing, ...],
        base_side: Side,
        shapes: Mapping[str, tuple[int, ...]],
        resolve: Callable[[str], str | None],
    ):
        self.base_side = base_side
        self.shapes = shapes
        self.resolve = resolve
        self._rules: list[_Rule] = []
        for pairing in pairings:
            theirs = [p.module for p in pairing.pieces] if base_side == ORIGINAL else [pairing.original]
            # the adapter's tensor name -> the base's
            attrs = {d: o for o, d in pairing.attrs} if base_side == ORIGINAL else dict(pairing.attrs)
            for module in dict.fromkeys(theirs):
                self._rules.append(_Rule(pairing, module, _pattern(module, "."), _pattern(module, "_"), attrs))

    def translate(self, targeted: TargetedEdit) -> list[TargetedEdit]:
        """``targeted`` on the base's names: one or more targets, each with its rows; itself when it names a base
        tensor as it is, or no rule names it (some names mean other tensors in the two layouts: Wan's norm2/norm3)."""
        if self.resolve(targeted.target) is not None:
            return [targeted]
        found = self._match(targeted.target)
        if found is None:
            return [targeted]
        rule, block, attr = found
        if targeted.rows is not None and rule.pairing.fused:
            raise ShapeMismatchError(
                f"{targeted.edit.adapter}: {targeted.edit.source_key!r} already addresses rows {targeted.rows} of "
                f"{targeted.target!r}, which lorafuse would have to split again; merge into a checkpoint in the "
                "adapter's own layout"
            )

        def name(template: str) -> str:
            return template.replace(BLOCK, block) if block is not None else template

        if self.base_side == ORIGINAL:
            return self._into_fused(targeted, rule.pairing, name, name(rule.module), rule.attrs[attr])
        return self._out_of_fused(targeted, rule.pairing, name, rule.attrs[attr])

    def _match(self, target: str) -> tuple[_Rule, str | None, str] | None:
        """(rule, block number, tensor name) of the rule naming ``target``'s module, fewest leading components
        dropped first; None when none does."""
        module, _, attr = target.rpartition(".")
        head = KOHYA_HEAD.match(module)
        if head and "." not in module:
            candidates = [(module[head.end() :], True)]
        else:
            parts = module.split(".") if module else []
            candidates = [(".".join(parts[i:]), False) for i in range(len(parts) + 1)]
        for name, flat in candidates:
            for rule in self._rules:
                if attr not in rule.attrs:
                    continue
                match = (rule.flat if flat else rule.dotted).fullmatch(name)
                if match:
                    return rule, match.groupdict().get("n"), attr
        return None

    def _shape(self, target: str) -> tuple[int, ...] | None:
        key = self.resolve(target)
        return tuple(self.shapes[key]) if key is not None and key in self.shapes else None

    def _into_fused(
        self, targeted: TargetedEdit, pairing: Pairing, name: Callable[[str], str], module: str, attr: str
    ) -> list[TargetedEdit]:
        """A diffusers module's update onto the original module holding its rows (a base in the original layout)."""
        target = _join(name(pairing.original), attr)
        if not pairing.fused:
            return [replace(targeted, target=target)]
        shape = self._shape(target)
        if shape is None:  # the plan refuses (or skips) a target the base does not have, naming it
            return [replace(targeted, target=target)]
        sizes = self._split_sizes(pairing, name, target, shape)
        placed, start = [], 0
        for piece, size in zip(pairing.pieces, sizes, strict=True):
            if name(piece.module) == module:
                edit = targeted.edit
                if piece.of > 1:
                    edit = RowSlice(edit, piece.part * size, (piece.part + 1) * size, size * piece.of)
                placed.append(replace(targeted, target=target, edit=edit, rows=(start, start + size)))
            start += size
        return placed

    def _split_sizes(
        self, pairing: Pairing, name: Callable[[str], str], target: str, shape: tuple[int, ...]
    ) -> list[int]:
        """The rows of each piece in the original tensor ``target`` of ``shape``."""
        rows, count = shape[0] if shape else 0, len(pairing.pieces)
        if pairing.split == "width":
            weight = self._shape(_join(name(pairing.original), "weight"))
            width = weight[1] if weight is not None and len(weight) > 1 else 0
            sizes = [width] * (count - 1) + [rows - width * (count - 1)]
        else:
            sizes = [rows // count] * count
        if sum(sizes) != rows or min(sizes) <= 0:
            raise ShapeMismatchError(
                f"base tensor {target!r} of shape {tuple(shape)} cannot hold the {count} row blocks "
                f"({', '.join(name(p.module) for p in pairing.pieces)}) its layout fuses into it; is this the model "
                "the adapter was trained on?"
            )
        return sizes

    def _out_of_fused(
        self, targeted: TargetedEdit, pairing: Pairing, name: Callable[[str], str], attr: str
    ) -> list[TargetedEdit]:
        """An original (fused) module's update split onto the diffusers modules holding its rows."""
        targets = [_join(name(piece.module), attr) for piece in pairing.pieces]
        if not pairing.fused:
            return [replace(targeted, target=targets[0])]
        shapes = [self._shape(t) for t in targets]
        missing = next((t for t, s in zip(targets, shapes, strict=True) if not s), None)
        if missing is not None:  # the plan refuses (or skips) a target the base does not have, naming it
            return [replace(targeted, target=missing)]
        sizes = []
        for piece, shape, target in zip(pairing.pieces, shapes, targets, strict=True):
            if shape[0] % piece.of:
                raise ShapeMismatchError(
                    f"base tensor {target!r} of shape {shape} does not split into {piece.of} equal row blocks"
                )
            sizes.append(shape[0] // piece.of)
        total, placed, start = sum(sizes), [], 0
        for piece, size, target in zip(pairing.pieces, sizes, targets, strict=True):
            rows = None if piece.of == 1 else (piece.part * size, (piece.part + 1) * size)
            edit = RowSlice(targeted.edit, start, start + size, total)
            placed.append(replace(targeted, target=target, edit=edit, rows=rows))
            start += size
        return placed
