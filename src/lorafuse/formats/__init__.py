"""Adapter formats. Each reader turns an adapter into targeted edits; :func:`read_adapter` detects the format."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError, InputError
from ..plan import AdapterInput
from .peft import CONFIG_NAME, read_peft_adapter

FORMATS = ("peft",)


def detect_format(path: Path) -> str:
    """The format of the adapter at ``path``."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return "peft"
    if not path.exists():
        raise InputError(f"adapter {path} does not exist")
    raise AdapterError(
        f"cannot tell the format of adapter {path}: a PEFT adapter folder needs {CONFIG_NAME} "
        f"(or pass --adapter-format; known: {', '.join(FORMATS)})"
    )


def read_adapter(path: Path, label: str | None = None, fmt: str | None = None, weight: float = 1.0) -> AdapterInput:
    """Read an adapter of any supported format into an :class:`AdapterInput`."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    label = label or str(path)
    if fmt == "peft":
        adapter = read_peft_adapter(path, label)
        return AdapterInput(
            label=label,
            edits=adapter.edits,
            weight=weight,
            target_modules=adapter.config.target_modules,
            modules=adapter.modules,
            keep_tied=bool(adapter.config.raw.get("ensure_weight_tying", False)),
            files=[adapter.checkpoint.files[0]],
            fmt="peft",
        )
    raise AdapterError(f"unknown adapter format {fmt!r}: use one of {', '.join(FORMATS)}")
