"""lorafuse: merge, extract, inspect and verify LoRA adapters without instantiating models."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import LorafuseError  # noqa: E402
from .merge import MergeReport, merge  # noqa: E402

__all__ = ["LorafuseError", "MergeReport", "merge", "__version__"]
