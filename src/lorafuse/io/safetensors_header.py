"""Torch-free reading of safetensors headers, validated as strictly as the safetensors library validates them.

Every reader of safetensors files in lorafuse goes through :func:`read_raw_header`, which checks the whole header
before any tensor byte is used: what the safetensors library (Rust ``Metadata::validate`` and ``read_metadata``)
refuses is refused here too, with one line naming the file and the tensor. A few things the library lets pass are
refused as well (duplicate JSON keys, a ``dtype`` written as a JSON object, a zero-size tensor whose other
dimensions overflow torch's sizes), as no writer produces them.

The CLI reads headers before ``import torch`` (see prefill.py), so nothing here may import torch.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
MAX_JSON_DEPTH = 64  # a real header nests 3 deep; the library stops at 128
U64_MAX = 2**64 - 1  # offsets and sizes are u64 (usize) in the library
MAX_ELEMENTS = 2**63 - 1  # torch sizes and strides are int64
FIX = "re-download or re-export it"
# Bits per element of every dtype the safetensors library knows (its ``Dtype::bitsize``).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
ENTRY_KEYS = frozenset(ENTRY_FIELDS)
# A JSON escape of a UTF-16 surrogate: Python decodes a lone one into a str that UTF-8 (and the library) refuse.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def is_lfs_pointer(path: Path) -> bool:
    """True when the file is a Git LFS pointer instead of the real content."""
    try:
        if path.stat().st_size > 1024:
            return False
        with open(path, "rb") as handle:
            return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def lfs_pointer_error(path: Path) -> InputError:
    return InputError(
        f"{path} is a Git LFS pointer, not the weights: install git-lfs and run `git lfs pull` in that repository"
    )


@dataclass(frozen=True)
class RawEntry:
    """One tensor as the header declares it: safetensors dtype code, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_raw_header(path: Path) -> tuple[list[RawEntry], dict[str, str]]:
    """Parse and validate a safetensors header: entries in header order and the ``__metadata__`` strings.

    Raises :class:`InputError` (naming the file, and the tensor where one is at fault) unless the header is a JSON
    object of well-formed entries whose byte ranges, sorted, tile the data section exactly: from 0, without gaps or
    overlaps, each the size its dtype and shape need, the last ending at the end of the file.
    """
    path = Path(path)
    if is_lfs_pointer(path):
        raise lfs_pointer_error(path)
    size, raw = _read_header_bytes(path)
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start = 8 + len(raw)
    entries = [_entry(path, name, value, data_start) for name, value in header.items()]
    _check_layout(path, entries, data_start, size)
    return entries, metadata


def _read_header_bytes(path: Path) -> tuple[int, bytes]:
    """(file size, header JSON bytes), after the length prefix was checked against the limit and the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is not a safetensors file (too short): {FIX}")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path} has a corrupt safetensors header (it claims {header_len} bytes, more than the "
                    f"{MAX_HEADER_BYTES} safetensors allows): {FIX}"
                )
            if header_len + 8 > size:
                raise InputError(
                    f"{path} has a corrupt or truncated safetensors header ({header_len} bytes claimed, "
                    f"file has {size}): {FIX}"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) != header_len:
        raise InputError(f"{path} is truncated (it changed while being read): {FIX}")
    return size, raw


class _BadJson(ValueError):
    """JSON that Python would read but the safetensors library refuses (raised from the decoder's hooks)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _BadJson(f"duplicate key {key[:80]!r}")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise _BadJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJson(f"number {text[:40]} is out of range")
    return value


def _json_int(text: str) -> int | float:
    # The library reads -0 as a float, and integers beyond 64 bits as floats (or out of range): not sizes.
    if text == "-0":
        return -0.0
    value = int(text)
    if value > U64_MAX or value < -(2**63):
        return _finite_float(text)
    return value


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    """The header as a dict, decoded as strictly as serde_json in the library (UTF-8, no NaN, bounded depth)."""
    try:
        text = raw.decode("utf-8")
        header = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_json_int,
        )
        if _SURROGATE_ESCAPE.search(raw):  # rare: walk every string only then
            _check_strings_and_depth(header, 1)
        for entry in header.values() if isinstance(header, dict) else ():
            # Only fields the library ignores can nest (anything else deep is refused by its type); walk those.
            if isinstance(entry, dict) and not entry.keys() <= ENTRY_KEYS:
                for key, value in entry.items():
                    if key not in ENTRY_KEYS:
                        _check_strings_and_depth(value, 3)  # the header is depth 1, the entry 2
    except RecursionError:
        raise InputError(f"{path} has a corrupt safetensors header (JSON nested too deeply): {FIX}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"{path} has a corrupt safetensors header ({reason}): {FIX}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} has a corrupt safetensors header (not a JSON object): {FIX}")
    return header


def _check_strings_and_depth(value: Any, depth: int) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings with lone surrogates (escapes UTF-8 cannot hold);
    ``value`` sits ``depth`` levels deep in the header."""
    stack = [(value, depth)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _BadJson("a string holds a lone surrogate escape") from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _BadJson(f"JSON nested more than {MAX_JSON_DEPTH} deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InputError(
            f"{path} has a corrupt safetensors header (__metadata__ must map strings to strings, "
            f"found {_short(value)}): {FIX}"
        )
    return dict(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_size(value: Any) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX  # not bool (an int subclass), not a float


def _entry(path: Path, name: str, value: Any, data_start: int) -> RawEntry:
    """One tensor's entry, its fields type-checked and its byte count checked against dtype x shape."""

    def bad(problem: str) -> InputError:
        return InputError(f"{path}: tensor {name!r} {problem} in the safetensors header: {FIX}")

    if not isinstance(value, dict):
        raise bad(f"has a malformed entry ({_short(value)})")
    missing = [f for f in ENTRY_FIELDS if f not in value]
    if missing:
        raise bad(f"has no {missing[0]!r}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise bad(f"has an invalid shape {_short(shape)} (a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise bad(f"has invalid data_offsets {_short(offsets)} (two non-negative integers)")
    start, end = offsets
    if end < start:
        raise bad(f"has reversed data_offsets [{start}, {end}]")
    elements = bound = 1
    for d in shape:  # the library's checked u64 product; torch also needs every stride in int64
        elements *= d
        bound *= max(d, 1)
    if bound > MAX_ELEMENTS or elements * DTYPE_BITS[dtype] > U64_MAX:
        raise bad(f"has a shape {_short(shape)} too large for any tensor")
    bits = elements * DTYPE_BITS[dtype]
    if bits % 8:
        raise bad(f"has shape {_short(shape)} that is not a whole number of bytes of {dtype}")
    if end - start != bits // 8:
        raise bad(f"holds {end - start} bytes but {dtype} x {_short(shape)} needs {bits // 8}")
    return RawEntry(name, dtype, tuple(shape), data_start + start, end - start)


def _check_layout(path: Path, entries: list[RawEntry], data_start: int, size: int) -> None:
    """The byte ranges, sorted, must tile the data section: from 0, no gap, no overlap, up to the file's end."""
    expected = data_start
    previous: RawEntry | None = None
    for entry in sorted(entries, key=lambda e: (e.offset, e.offset + e.nbytes)):
        if entry.offset < expected and previous is not None:  # offsets are never below data_start
            raise InputError(
                f"{path}: tensor {entry.name!r} overlaps tensor {previous.name!r} (bytes {entry.offset - data_start}.."
                f"{entry.offset - data_start + entry.nbytes} of the data section): {FIX}"
            )
        if entry.offset > expected:
            raise InputError(
                f"{path}: the safetensors header leaves {entry.offset - expected} bytes unused before tensor "
                f"{entry.name!r}: {FIX}"
            )
        expected = entry.offset + entry.nbytes
        previous = entry
    if expected > size:
        last = f"tensor {previous.name!r} ends" if previous is not None else "the data ends"
        raise InputError(f"{path} is truncated ({last} at byte {expected}, the file has {size}): {FIX}")
    if expected < size:
        raise InputError(
            f"{path} has {size - expected} bytes after its last tensor that the safetensors header does not "
            f"describe: {FIX}"
        )
