"""How many threads the merge kernel runs (engine/kernel.py)."""

from __future__ import annotations

import os

from .cpus import usable_cpus

MAX_MATH_THREADS = 4


def math_threads() -> int:
    """Threads merging tensors side by side: LORAFUSE_MATH_THREADS, else every usable CPU, up to 4.

    numpy's loops and products release the GIL and each product runs on one BLAS thread, so the threads share the
    cores (cpus.py: affinity and cgroup quota, not the host's count). Measured with the numpy kernel (then the
    CLI's fast path) on 2 cores: a second thread was faster in every run of ``bench/merge_bench.py --variants``
    (e.g. 1.46x against 1.75x ``cp -r``); beyond 4 the page-cache writes, not the math, set the pace.
    """
    value = os.environ.get("LORAFUSE_MATH_THREADS", "")
    return max(1, int(value)) if value.isdigit() else max(1, min(MAX_MATH_THREADS, usable_cpus()))
