"""Output writers, registered by name: ``lorafuse merge --format NAME`` takes its choices from
:func:`output_formats` (importable without torch). A new output format is one module here defining a
:class:`~lorafuse.writers.base.ModelWriter` subclass, registered with :func:`register_writer` below.
"""

from __future__ import annotations

from ..errors import LorafuseError
from .base import ModelWriter, ShardLayout, TensorSink

__all__ = ["ModelWriter", "ShardLayout", "TensorSink", "get_writer", "output_formats", "register_writer"]

_WRITERS: dict[str, type[ModelWriter]] = {}


def register_writer(cls: type[ModelWriter]) -> type[ModelWriter]:
    """Register an output format under ``cls.name`` (usable as a class decorator)."""
    if cls.name in _WRITERS and _WRITERS[cls.name] is not cls:
        raise ValueError(f"output format {cls.name!r} registered twice")
    _WRITERS[cls.name] = cls
    return cls


def output_formats() -> tuple[str, ...]:
    """The registered output format names, in registration order (the first is the default)."""
    return tuple(_WRITERS)


def get_writer(name: str) -> ModelWriter:
    """The writer of output format ``name``; a one-line error naming the choices for an unknown one."""
    cls = _WRITERS.get(name)
    if cls is None:
        raise LorafuseError(f"unknown output format {name!r}: use {' or '.join(_WRITERS)}")
    return cls()


# The built-in formats; neither module imports torch (the .bin writer imports it only when it saves).
from .bin import BinWriter  # noqa: E402
from .gguf import GGUFModelWriter  # noqa: E402  (imports gguf only when used)
from .safetensors import SafetensorsWriter  # noqa: E402

register_writer(SafetensorsWriter)
register_writer(BinWriter)
register_writer(GGUFModelWriter)
