"""The kernels that apply a merge plan: numpy on the CPU (kernel.py) and torch on a GPU (cuda.py). The merge
pipeline that feeds them is merger.py."""

from __future__ import annotations

from .kernel import compute_tensor

__all__ = ["compute_tensor"]
