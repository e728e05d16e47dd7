"""Adapter formats. Each reader turns an adapter into targeted edits; :func:`read_adapter` detects the format."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..edits import RowReplace, TargetedEdit
from ..errors import AdapterError, InputError
from ..keymatch import KeyMatcher
from ..plan import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING, AdapterInput
from .diffusion import read_diffusion
from .kohya import read_kohya
from .peft import CONFIG_NAME, read_peft_adapter
from .plain import read_plain
from .single import adapter_file, open_adapter, sniff_format

FORMATS = ("peft", "kohya", "diffusion", "plain")
SINGLE_FILE_FORMATS = ("kohya", "diffusion", "plain")


def detect_format(path: Path) -> str:
    """The format of the adapter at ``path``."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return "peft"
    if not path.exists():
        raise InputError(f"adapter {path} does not exist")
    if path.is_file() and (path.parent / CONFIG_NAME).is_file() and path.name.startswith("adapter_model"):
        return "peft"
    checkpoint = open_adapter(path)
    try:
        found = sniff_format(checkpoint.keys())
    finally:
        checkpoint.close()
    if found == "peft":
        raise AdapterError(
            f"{path} holds PEFT tensors (base_model.model.*) but no {CONFIG_NAME} beside it: "
            "put the adapter's adapter_config.json next to the weights and pass the folder"
        )
    if found is not None:
        return found
    raise AdapterError(
        f"cannot tell the format of adapter {path}: a PEFT adapter folder needs {CONFIG_NAME} "
        f"(or pass --adapter-format; known: {', '.join(FORMATS)})"
    )


def _tokens_only(edits: list[TargetedEdit]) -> bool:
    """True when trainable tokens are the adapter's only change to embeddings and heads: PEFT ties their rows to
    a tied output head (the same rows moved together in training), so the pair stays tied."""
    vocab = [e for e in edits if e.target.endswith((*EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING))]
    return bool(vocab) and all(isinstance(e.edit, RowReplace) for e in vocab)


def read_adapter(
    path: Path,
    label: str | None = None,
    fmt: str | None = None,
    weight: float = 1.0,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> AdapterInput:
    """Read an adapter of any supported format into an :class:`AdapterInput`.

    ``base_shapes`` (base tensor name -> shape) lets formats that name tensors differently from the base (kohya)
    resolve their names, and conv LoRAs pick their layout; kohya files need it.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    label = label or str(path)
    if fmt == "peft":
        # A PEFT weight file passed on its own reads as its folder (its adapter_config.json sits beside it).
        folder, weights = (path.parent, path) if path.is_file() else (path, None)
        adapter = read_peft_adapter(folder, label, weights=weights)
        return AdapterInput(
            label=label,
            edits=adapter.edits,
            weight=weight,
            target_modules=adapter.config.target_modules,
            modules=adapter.modules,
            keep_tied=bool(adapter.config.raw.get("ensure_weight_tying", False)) or _tokens_only(adapter.edits),
            files=[adapter.checkpoint.files[0]],
            fmt="peft",
        )
    if fmt in SINGLE_FILE_FORMATS:
        return _read_single_file(path, label, fmt, weight, base_shapes)
    raise AdapterError(f"unknown adapter format {fmt!r}: use one of {', '.join(FORMATS)}")


def _read_single_file(
    path: Path, label: str, fmt: str, weight: float, base_shapes: Mapping[str, tuple[int, ...]] | None
) -> AdapterInput:
    checkpoint = open_adapter(path)
    matcher = KeyMatcher(list(base_shapes)) if base_shapes is not None else None

    def shape_of(target: str) -> tuple[int, ...] | None:
        key = matcher.resolve(target) if matcher is not None else None
        return tuple(base_shapes[key]) if (key is not None and base_shapes is not None) else None

    if fmt == "kohya":
        adapter = read_kohya(checkpoint, label, list(base_shapes) if base_shapes is not None else None, shape_of)
    elif fmt == "diffusion":
        adapter = read_diffusion(checkpoint, label, shape_of)
    else:
        adapter = read_plain(checkpoint, label, shape_of)
    return AdapterInput(
        label=label,
        edits=adapter.edits,
        weight=weight,
        modules=adapter.modules,
        files=[adapter_file(path)],
        fmt=fmt,
    )
