"""lorafuse: merge, extract, inspect and verify LoRA adapters without instantiating models."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from .errors import LorafuseError

# lorafuse needs no numpy (io/byte_view.py); torch warns at import when it is missing, which would only confuse.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"
__all__ = ["LorafuseError", "MergeReport", "merge", "__version__"]

if TYPE_CHECKING:
    from .merger import MergeReport, merge


def __getattr__(name: str) -> Any:
    # Lazy: `import torch` costs about a second, and the CLI starts writing the output before it (io/prefill.py).
    if name in ("merge", "MergeReport"):
        from . import merger

        value = getattr(merger, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorafuse' has no attribute {name!r}")
