"""The adapter format registry: each format is one module that registers an :class:`AdapterFormat` (its name, how
to recognise it, how to read it and, where lorafuse writes it, how to write it). Detection asks the formats in
``priority`` order (lowest first, then registration order), so a more specific format sniffs before a more general
one (kohya before diffusion before plain, whose key suffixes overlap). No torch here: the CLI lists
:func:`registered_formats` while it builds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError
from ..names import Layout, layout_of

if TYPE_CHECKING:
    from ..plan import AdapterInput


@dataclass
class ReadContext:
    """What a format's ``read`` gets besides the path: the label and strength of the adapter, and the base's tensor
    shapes (name -> shape) when known, whose layout resolves names (kohya needs it) and lays out conv LoRAs."""

    label: str
    weight: float = 1.0
    base_shapes: Mapping[str, tuple[int, ...]] | None = None

    @cached_property
    def layout(self) -> Layout | None:
        """The base checkpoint's layout and name maps; None without the base."""
        return layout_of(self.base_shapes) if self.base_shapes is not None else None

    def shape_of(self, target: str) -> tuple[int, ...] | None:
        """The shape of the base tensor ``target`` resolves to; None when unknown."""
        key = self.layout.resolve(target) if self.layout is not None else None
        return tuple(self.base_shapes[key]) if (key is not None and self.base_shapes is not None) else None


@dataclass(frozen=True)
class StoredNames:
    """How a format names the tensors lorafuse writes into it (extract streams tensors under these names)."""

    fmt: str
    lora: Callable[[str], tuple[str, str, str | None]]  # module -> (up, down, alpha or None)
    diff: Callable[[str], str | None]  # base tensor -> its full difference's name; None when it cannot hold one

    def lora_names(self, module: str) -> tuple[str, str, str | None]:
        """(up name, down name, alpha name or None) of LoRA module ``module``."""
        return self.lora(module)

    def diff_name(self, name: str) -> str | None:
        """The name of base tensor ``name``'s full difference (None when the format cannot name it)."""
        return self.diff(name)


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format. ``sniff(path)``: whether the file or folder is this format's (it may raise a one-line
    error for a file that is this format's but unusable); ``read(path, context)``: the adapter's edits;
    ``write(output, tensors, config, *, overwrite, inputs, checked)`` and ``names``: where lorafuse writes it."""

    name: str
    sniff: Callable[[Path], bool]
    read: Callable[[Path, ReadContext], AdapterInput]
    write: Callable[..., Path] | None = None
    names: StoredNames | None = field(default=None)
    priority: int = 50


_FORMATS: dict[str, AdapterFormat] = {}


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    """Register ``fmt`` under its name (detection tries formats by ``priority``, then in registration order)."""
    if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
        raise ValueError(f"adapter format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove format ``name`` (for tests that register a format of their own)."""
    _FORMATS.pop(name, None)


def registered_formats() -> tuple[str, ...]:
    """The registered adapter format names, in detection order."""
    return tuple(f.name for f in formats())


def formats() -> tuple[AdapterFormat, ...]:
    """The registered formats, in detection order."""
    return tuple(sorted(_FORMATS.values(), key=lambda f: f.priority))


def get_format(name: str) -> AdapterFormat:
    """The format ``name``; a one-line error listing the registered ones for an unknown name."""
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise AdapterError(f"unknown adapter format {name!r}: use one of {', '.join(registered_formats())}")
    return fmt


def writer_of(name: str) -> AdapterFormat:
    """The format ``name`` where lorafuse writes it; a one-line error listing those it writes otherwise."""
    fmt = _FORMATS.get(name)
    if fmt is None or fmt.write is None:
        writable = ", ".join(written_formats())
        raise AdapterError(f"lorafuse does not write adapter format {name!r}: use one of {writable}")
    return fmt


def written_formats() -> tuple[str, ...]:
    """The formats lorafuse writes (``lorafuse extract --format``)."""
    return tuple(f.name for f in formats() if f.write is not None)
