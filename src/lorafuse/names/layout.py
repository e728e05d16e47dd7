"""The checkpoint layout a merge maps names onto, and the name maps that go with it.

Today only the generic layout exists: adapter names equal the checkpoint's up to head prefixes (:class:`PrefixMap`),
and kohya's flattened names are unflattened against the checkpoint's own module names (:class:`KohyaNames`). Layout
tables (diffusers <-> original checkpoints, HF <-> GGUF) plug in here as further layouts chosen by
:func:`layout_of`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .kohya import KohyaNames
from .prefixes import PrefixMap

GENERIC = "generic"


@dataclass
class Layout:
    """A checkpoint's layout (``name``) and its name maps, built from the checkpoint's tensor names."""

    name: str
    base_keys: list[str] = field(repr=False)

    @cached_property
    def prefixes(self) -> PrefixMap:
        """Adapter target names -> checkpoint tensor names across head-prefix differences."""
        return PrefixMap(self.base_keys)

    @cached_property
    def kohya(self) -> KohyaNames:
        """kohya's flattened module names -> the checkpoint's dotted module names."""
        return KohyaNames(self.base_keys)

    def resolve(self, target: str) -> str | None:
        """The checkpoint tensor an adapter's ``target`` names; None when none or several match."""
        return self.prefixes.resolve(target)

    def ambiguous(self, target: str) -> list[str]:
        """Every candidate when ``target`` matches more than one checkpoint tensor."""
        return self.prefixes.ambiguous(target)


def layout_of(base_keys: Iterable[str], config: Mapping[str, Any] | None = None) -> Layout:
    """The layout of a checkpoint with tensor names ``base_keys`` (and ``config.json`` ``config``, which layout
    detection may read), with its name maps."""
    del config  # only the generic layout exists yet; layout tables will tell layouts apart by names and config
    return Layout(GENERIC, list(base_keys))
