"""How many threads merge LoRA-only tensors (the torch engine and the torch-free fast path alike)."""

from __future__ import annotations

import os

from .cpus import usable_cpus

# Threads merging LoRA-only tensors side by side (torch ops release the GIL; each op runs on one thread): half the
# usable CPUs (cpus.py: affinity and cgroup quota, not the host's count), up to 4, as the other half serves the
# writer thread, the prefill and the kernel's page-cache copies (on 2 cores a second math thread cost 30% more CPU
# time and was slower, bench/merge_bench.py --variants).
# LORAFUSE_MATH_THREADS overrides.
MATH_THREADS = max(1, min(4, usable_cpus() // 2))


def math_threads() -> int:
    """How many threads merge LoRA-only tensors: LORAFUSE_MATH_THREADS, else half the cores, up to 4."""
    value = os.environ.get("LORAFUSE_MATH_THREADS", "")
    return max(1, int(value)) if value.isdigit() else MATH_THREADS


def fast_path_threads() -> int:
    """Threads of the torch-free fast path (fastpath.py): LORAFUSE_MATH_THREADS, else every core up to 4.

    With no ``import torch`` beside it, a second thread on 2 cores was faster in every run of
    ``bench/merge_bench.py --variants`` (e.g. 1.46x against 1.75x ``cp -r``), unlike in the torch engine.
    """
    value = os.environ.get("LORAFUSE_MATH_THREADS", "")
    return max(1, int(value)) if value.isdigit() else max(1, min(4, usable_cpus()))
