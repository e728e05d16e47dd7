"""The compiled dtype conversions (``_fastcast.c``: AVX2 + F16C) where they are built and this CPU runs them.

numpy's fp32 -> fp16 cast is scalar C in numpy's build; the compiled ones convert 10-30x faster with the same
bits for every non-NaN value (all 2**32 fp32 patterns checked against numpy and ml_dtypes). The extension is
optional: without a C compiler at install time, on another CPU, or with ``LORAFUSE_FASTCAST=0``, :data:`FAST` is
None and arrays.py keeps its numpy paths, which give the same bytes.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np


def _load() -> ModuleType | None:
    if os.environ.get("LORAFUSE_FASTCAST", "1") == "0":
        return None
    try:
        from . import _fastcast  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _fastcast if _fastcast.available() else None


FAST = _load()


def contiguous(*arrays: np.ndarray) -> bool:
    """True when every array is C-contiguous (the compiled conversions read and write flat buffers)."""
    return all(a.flags.c_contiguous for a in arrays)


def bits16(values: np.ndarray) -> np.ndarray:
    """A 16-bit array's raw bits (ml_dtypes' bfloat16 exports no buffer format)."""
    return values.view(np.uint16)
