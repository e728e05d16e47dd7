"""gguf-py's ``GGUFWriter`` with long metadata arrays packed in one go, byte for byte as gguf-py packs them.

gguf-py packs an array item by item (a ``struct.pack`` and a type check per token): a 151936-token vocabulary
and its merges took 0.45 s, before the first tensor of a GGUF merge could be written. Here an array of one item
type is packed at once (strings joined with their lengths, numbers in one ``struct.pack``); anything else, and a
big-endian file, goes through gguf-py's own code.
"""

from __future__ import annotations

import struct
from functools import cache
from typing import Any

from .names.gguf import require_gguf


@cache
def writer_class() -> type:
    """``GGUFWriter`` with :func:`_pack_array` for arrays (built on first use: gguf is an optional extra)."""
    gguf = require_gguf()
    kinds = gguf.GGUFValueType

    class FastArrayWriter(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == kinds.ARRAY and self.endianess == gguf.GGUFEndian.LITTLE:
                packed = _pack_array(gguf, val, sub_type, self._simple_value_packing)
                if packed is not None:
                    return (struct.pack("<I", vtype) if add_vtype else b"") + packed
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return FastArrayWriter


def new_writer(arch: str) -> Any:
    """A header-only writer (no file yet) for architecture ``arch``."""
    return writer_class()(path=None, arch=arch)


def _pack_array(gguf: Any, val: Any, sub_type: Any, simple: dict) -> bytes | None:
    """The array's item type, count and items as gguf-py writes them, or None where gguf-py's own path must run
    (nested arrays, mixed item types, bytes objects, empty arrays: its errors stay its own)."""
    kinds = gguf.GGUFValueType
    if isinstance(val, (bytes, bytearray)) or not isinstance(val, (list, tuple)) or not val:
        return None
    if sub_type is None:  # gguf-py's check: every item's type is the first one's
        types = {kinds.get_type(item) for item in {type(v): v for v in val}.values()}
        if len(types) != 1:
            return None
        sub_type = types.pop()
    head = struct.pack("<IQ", sub_type, len(val))
    if sub_type == kinds.STRING:
        encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
        return head + b"".join(struct.pack("<Q", len(b)) + b for b in encoded)
    fmt = simple.get(sub_type)
    if fmt is None:
        return None
    return head + struct.pack(("" if sub_type == kinds.BOOL else "<") + f"{len(val)}{fmt}", *val)
