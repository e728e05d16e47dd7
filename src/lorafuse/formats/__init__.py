"""Adapter formats, one module each, registered in :mod:`.registry`: :func:`detect_format` asks each format's
``sniff``, :func:`read_adapter` its ``read``. Adding a format is adding a module that registers itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import AdapterError, InputError
from ..plan import AdapterInput

# The built-in formats register themselves on import; their priorities give the detection order: PEFT (a folder
# with its config), then single files from the most specific key names to the most general (kohya, diffusion, plain).
from . import diffusion, flux_lora, kohya, peft, plain  # noqa: F401
from .registry import ReadContext, formats, get_format, registered_formats

__all__ = ["detect_format", "read_adapter", "registered_formats"]


def detect_format(path: Path) -> str:
    """The format of the adapter at ``path``: the first registered format whose ``sniff`` claims it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"adapter {path} does not exist")
    for fmt in formats():
        if fmt.sniff(path):
            return fmt.name
    raise AdapterError(
        f"cannot tell the format of adapter {path}: a PEFT adapter folder needs {peft.CONFIG_NAME} "
        f"(or pass --adapter-format; known: {', '.join(registered_formats())})"
    )


def read_adapter(
    path: Path,
    label: str | None = None,
    fmt: str | None = None,
    weight: float = 1.0,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> AdapterInput:
    """Read an adapter of any registered format into an :class:`AdapterInput`.

    ``base_shapes`` (base tensor name -> shape) lets formats that name tensors differently from the base (kohya)
    resolve their names, and conv LoRAs pick their layout; kohya files need it.
    """
    path = Path(path)
    reader = get_format(fmt or detect_format(path))
    return reader.read(path, ReadContext(label or str(path), weight, base_shapes))
