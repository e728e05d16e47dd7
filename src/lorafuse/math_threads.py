"""How many threads merge LoRA-only tensors (the torch engine and the torch-free fast path alike)."""

from __future__ import annotations

import os

# Threads merging LoRA-only tensors side by side (torch ops release the GIL; each op runs on one thread): half the
# cores, up to 4, as the other half serves the writer thread, the prefill and the kernel's page-cache copies (on 2
# cores a second math thread cost 30% more CPU time and was slower, bench/merge_bench.py --variants).
# LORAFUSE_MATH_THREADS overrides.
MATH_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))


def math_threads() -> int:
    """How many threads merge LoRA-only tensors: LORAFUSE_MATH_THREADS, else half the cores, up to 4."""
    value = os.environ.get("LORAFUSE_MATH_THREADS", "")
    return max(1, int(value)) if value.isdigit() else MATH_THREADS
