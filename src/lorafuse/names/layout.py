"""The checkpoint layout a merge maps names onto, and the name maps that go with it.

Every layout resolves adapter names that equal the checkpoint's up to head prefixes (:class:`PrefixMap`) and kohya's
flattened names (:class:`KohyaNames`). A registered layout (:func:`register_layout`: Flux's BFL and diffusers
layouts in :mod:`.flux`, Wan's in :mod:`.wan`) adds a name table (:mod:`.paired`) that moves an adapter's targets
named in the family's other layout onto this one. :func:`layout_of` picks the first registered layout whose
detector claims the checkpoint's tensor names, else the generic one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..edits import TargetedEdit
from .kohya import KohyaNames
from .paired import PairedNames, Pairing, Side
from .prefixes import PrefixMap

GENERIC = "generic"


@dataclass(frozen=True)
class LayoutKind:
    """A registered layout: its ``name``, ``detect(base_keys)`` (whether a checkpoint is in it) and the name table
    from the family's other layout (``pairings``, with the side of it this layout is)."""

    name: str
    detect: Callable[[list[str]], bool]
    pairings: tuple[Pairing, ...]
    side: Side


_LAYOUTS: dict[str, LayoutKind] = {}


def register_layout(kind: LayoutKind) -> LayoutKind:
    """Register ``kind`` (detection asks the layouts in registration order)."""
    if kind.name in _LAYOUTS and _LAYOUTS[kind.name] is not kind:
        raise ValueError(f"checkpoint layout {kind.name!r} registered twice")
    _LAYOUTS[kind.name] = kind
    return kind


def registered_layouts() -> tuple[str, ...]:
    """The registered layout names, in detection order (the generic layout is not one of them)."""
    return tuple(_LAYOUTS)


@dataclass
class Layout:
    """A checkpoint's layout (``name``) and its name maps, built from the checkpoint's tensor names (and shapes,
    which size the rows of fused tensors)."""

    name: str
    base_keys: list[str] = field(repr=False)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    kind: LayoutKind | None = field(default=None, repr=False)

    @cached_property
    def prefixes(self) -> PrefixMap:
        """Adapter target names -> checkpoint tensor names across head-prefix differences."""
        return PrefixMap(self.base_keys)

    @cached_property
    def kohya(self) -> KohyaNames:
        """kohya's flattened module names -> the checkpoint's dotted module names."""
        return KohyaNames(self.base_keys)

    @cached_property
    def paired(self) -> PairedNames | None:
        """The other layout's names -> this one's (None for the generic layout)."""
        if self.kind is None:
            return None
        return PairedNames(self.kind.pairings, self.kind.side, self.shapes, self.resolve)

    def resolve(self, target: str) -> str | None:
        """The checkpoint tensor an adapter's ``target`` names; None when none or several match."""
        return self.prefixes.resolve(target)

    def ambiguous(self, target: str) -> list[str]:
        """Every candidate when ``target`` matches more than one checkpoint tensor."""
        return self.prefixes.ambiguous(target)

    def translate(self, edits: Iterable[TargetedEdit]) -> list[tuple[TargetedEdit, TargetedEdit]]:
        """Each of ``edits`` with the edits it becomes on this layout's names (a target named in the family's other
        layout, renamed or split by rows), as (the adapter's edit, one of its edits here) pairs, in order."""
        if self.paired is None:
            return [(edit, edit) for edit in edits]
        return [(edit, placed) for edit in edits for placed in self.paired.translate(edit)]


def layout_of(base: Iterable[str] | Mapping[str, tuple[int, ...]], config: Mapping[str, Any] | None = None) -> Layout:
    """The layout of a checkpoint with tensor names ``base`` (or tensor name -> shape, which fused-row tables need)
    and ``config.json`` ``config``, with its name maps."""
    del config  # the layouts registered so far tell themselves apart by tensor names
    shapes = dict(base) if isinstance(base, Mapping) else {}
    keys = list(base)
    kind = next((k for k in _LAYOUTS.values() if k.detect(keys)), None)
    return Layout(kind.name if kind else GENERIC, keys, shapes, kind)
