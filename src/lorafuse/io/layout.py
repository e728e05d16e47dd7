"""Output layout: shard sizes and names, tensor offsets and the safetensors header bytes.

Both the merge pipeline (engine/pipeline.py) and its early prefill (prefill.py, started before the adapters are
read) lay out shards with these functions, so the two agree byte for byte.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorafuseError

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.I)
UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000 (as transformers reads max_shard_size); ints pass through."""
    if isinstance(size, int):
        return size
    match = SIZE_RE.match(str(size))
    if not match or (match.group(2) or "").upper() not in UNITS:
        raise LorafuseError(f"cannot read size {size!r}: use a number with a unit, e.g. 5GB or 500MB")
    value = float(match.group(1)) * UNITS[(match.group(2) or "").upper()]
    if not math.isfinite(value):  # 400 digits read as inf: int() would raise OverflowError
        raise LorafuseError(f"cannot read size {size!r}: use a number with a unit, e.g. 5GB or 500MB")
    return int(value)


@dataclass
class Slot:
    """Where one output tensor goes."""

    name: str
    dtype: str  # the safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    shard: int = 0
    offset: int = 0  # absolute offset in the shard file (safetensors)


def layout_shards(slots: list[Slot], max_shard_size: int) -> list[list[Slot]]:
    """Greedy sharding in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Slot]] = [[]]
    size = 0
    for slot in slots:
        if shards[-1] and size + slot.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
        slot.shard = len(shards) - 1
    return shards


def shard_names(prefix: str, count: int, suffix: str) -> list[str]:
    if count == 1:
        return [f"{prefix}{suffix}"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}{suffix}" for i in range(count)]


def safetensors_header(slots: list[Slot], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix + JSON padded to 8 bytes) for tensors written in the given order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for slot in slots:
        header[slot.name] = {
            "dtype": slot.dtype,
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    for slot, entry in zip(slots, (header[s.name] for s in slots)):
        slot.offset = len(head) + entry["data_offsets"][0]  # type: ignore[index]
    return head


def write_index(path: Path, slots: list[Slot], names: list[str], metadata: dict | None = None) -> None:
    """A transformers-style ``*.index.json`` mapping every tensor to its shard file."""
    total = sum(s.nbytes for s in slots)
    weight_map = {s.name: names[s.shard] for s in slots}
    body = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(body, indent=2) + "\n")
