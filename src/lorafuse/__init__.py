"""lorafuse: merge, extract, inspect and verify LoRA adapters without instantiating models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import LorafuseError

__version__ = "0.1.0"
__all__ = ["LorafuseError", "MergeReport", "merge", "__version__"]

if TYPE_CHECKING:
    from .merger import MergeReport, merge


def __getattr__(name: str) -> Any:
    # Lazy: the merge pipeline imports numpy and every format; `lorafuse --help` needs none of them.
    if name in ("merge", "MergeReport"):
        from . import merger

        value = getattr(merger, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
