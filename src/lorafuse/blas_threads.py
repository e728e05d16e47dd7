"""Threads for numpy math, sized to the CPUs free for this process, that never spin.

numpy's BLAS pool (OpenBLAS) is gang-scheduled and spins: a product split over two of its threads waits for the
slower one, so a thread that shares its CPU with another busy process makes every product wait for the scheduler,
and after each product its threads busy-wait for a while. Measured on 2 cores beside one CPU-bound process:
``Q^T A`` of a 6144 x 2048 fp32 matrix with a 24-column ``Q`` took 175 ms on two BLAS threads against 7.6 ms on
one, the SVD of the 24 x 2048 result 125 ms against 1.3 ms; on an otherwise idle machine a whole extraction on two
BLAS threads took 1.8x the CPU time of one thread for 6% less wall time. So BLAS runs on one thread
(:meth:`BlasPool.one_thread`), and lorafuse splits the large products and the element-wise loops itself
(:meth:`BlasPool.run`) over as many of its own threads as CPUs are free; they wait on a queue, never spinning.
numpy releases the GIL in BLAS calls and in its loops, so the spans really run side by side. Only a full SVD
(``--exact-svd``), which lorafuse cannot split, lets BLAS use the free CPUs (:meth:`BlasPool.blas`).

How many CPUs are free is measured over the time since the previous decision, without sleeping: the CPUs that
were idle plus those this process used itself (its own threads are not competition).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from . import cpus

MIN_WINDOW = 0.5  # seconds of history behind a new decision; /proc/stat counts in 10 ms ticks
FIRST_WINDOW = 0.1  # ... behind the first one (until then: every usable CPU)


def free_threads(cap: int, idle_cpus: float, own_cpus: float) -> int:
    """Threads to use: the CPUs that were idle or busy with this process, within ``cap``, at least 1.

    ``idle_cpus``: idle CPUs (of this process's affinity mask) averaged over the last window; ``own_cpus``: the
    CPU time this process used in that window divided by its length.
    """
    return max(1, min(cap, round(idle_cpus + own_cpus)))


def _sample(mask: set[int] | None) -> tuple[float, float, float, float] | None:
    """(wall s, this process's CPU s, idle jiffies, total jiffies of ``mask``'s CPUs) now; None without /proc/stat."""
    try:
        idle, total = cpus.cpu_times(mask)
    except (OSError, ValueError):
        return None
    own = os.times()
    return time.monotonic(), own.user + own.system, idle, total


class BlasPool:
    """lorafuse's own threads for numpy math, and numpy's BLAS pool, sized to the free CPUs (see the module).

    ``cap``: :func:`cpus.usable_cpus` (affinity and cgroup quota), and never more than numpy's BLAS pool was started
    with (a user's ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` is kept). ``LORAFUSE_CPUS`` fixes the count (no
    measuring). :meth:`close` ends the threads.
    """

    def __init__(self) -> None:
        from threadpoolctl import ThreadpoolController

        self._blas = ThreadpoolController().select(user_api="blas")
        pool = max((lib.num_threads for lib in self._blas.lib_controllers), default=1)
        self.cap = max(1, min(cpus.usable_cpus(), pool))
        self._fixed = self.cap == 1 or cpus.fixed_cpus() is not None
        self._mask = cpus.affinity_mask()
        self._threads = self.cap
        self._decided = False
        self._last = None if self._fixed else _sample(self._mask)
        self._executor: ThreadPoolExecutor | None = None

    def threads_now(self) -> int:
        """How many threads to use now: :func:`free_threads` over the time since the last new decision."""
        if self._fixed or self._last is None:
            return self._threads
        wall0, own0, idle0, total0 = self._last
        if time.monotonic() - wall0 < (MIN_WINDOW if self._decided else FIRST_WINDOW):
            return self._threads
        now = _sample(self._mask)
        if now is None or now[3] <= total0:
            return self._threads
        wall1, own1, idle1, total1 = now
        count = len(self._mask) if self._mask else (os.cpu_count() or 1)
        idle_cpus = (idle1 - idle0) / (total1 - total0) * count
        self._threads = free_threads(self.cap, idle_cpus, (own1 - own0) / (wall1 - wall0))
        self._last, self._decided = now, True
        return self._threads

    def spans(self, units: int, step: int = 1) -> list[tuple[int, int]]:
        """``range(units)`` cut into one contiguous span per thread to use now, each a multiple of ``step`` long
        (the last one excepted); fewer spans where there are fewer steps."""
        step = max(1, step)
        threads = max(1, min(self.threads_now(), -(-units // step)))
        bounds = [min(units, -(-units * i // threads // step) * step) for i in range(threads)] + [units]
        return list(zip(bounds, bounds[1:]))

    def run(self, spans: list[tuple[int, int]], work: Callable[[int, int, int], float]) -> float:
        """The sum of ``work(index, start, stop)`` over ``spans``, side by side: the first on this thread."""
        if len(spans) > 1 and self._executor is None:
            self._executor = ThreadPoolExecutor(self.cap - 1, thread_name_prefix="lorafuse-math")
        futures = [self._executor.submit(work, i, *span) for i, span in enumerate(spans) if i]  # type: ignore[union-attr]
        total = work(0, *spans[0]) if spans else 0.0
        return total + sum(future.result() for future in futures)

    @contextmanager
    def one_thread(self) -> Iterator[None]:
        """numpy's BLAS on one thread (the calling one) for the block: lorafuse's threads split the work instead."""
        with self._blas.limit(limits=1):
            yield

    @contextmanager
    def blas(self) -> Iterator[int]:
        """numpy's BLAS on :meth:`threads_now` threads for the block (a full SVD, which lorafuse cannot split)."""
        threads = self.threads_now()
        with self._blas.limit(limits=threads):
            yield threads

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
