"""Threads for numpy math sized to the free CPUs (blas_threads.py): the decision, the measured window, the spans
and numpy's BLAS pool."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from threadpoolctl import threadpool_info

from lorafuse import blas_threads
from lorafuse.blas_threads import BlasPool, free_threads


def blas_threads_now() -> int:
    return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


@pytest.mark.parametrize(
    ("cap", "idle", "own", "threads"),
    [
        (2, 1.0, 1.0, 2),  # idle machine, lorafuse on one CPU: both are free
        (2, 0.0, 1.0, 1),  # one competing process beside lorafuse's one thread
        (2, 0.0, 1.33, 1),  # ... beside two threads (3 runnable on 2 CPUs): still one
        (2, 0.0, 0.0, 1),  # everything busy elsewhere: one thread, never none
        (4, 6.0, 2.0, 4),  # never more than the usable CPUs / the BLAS pool
        (8, 2.6, 1.0, 4),
    ],
)
def test_free_threads_counts_idle_cpus_and_its_own(cap, idle, own, threads):
    assert free_threads(cap, idle, own) == threads


@pytest.fixture
def two_cpus(monkeypatch):
    """A BlasPool on 2 usable CPUs with a fake clock and /proc/stat; the returned ``feed(dt, idle, own)`` advances
    the window by ``dt`` seconds in which ``idle`` CPUs were idle and this process used ``own`` CPUs."""
    if blas_threads_now() < 2:
        pytest.skip("numpy's BLAS pool has one thread here")
    monkeypatch.delenv("LORAFUSE_CPUS", raising=False)
    monkeypatch.setattr(blas_threads.cpus, "usable_cpus", lambda: 2)
    monkeypatch.setattr(blas_threads.cpus, "affinity_mask", lambda: {0, 1})
    state = {"wall": 100.0, "own": 5.0, "idle": 1000.0, "total": 4000.0}
    monkeypatch.setattr(blas_threads, "time", SimpleNamespace(monotonic=lambda: state["wall"]))
    monkeypatch.setattr(
        blas_threads, "_sample", lambda mask: (state["wall"], state["own"], state["idle"], state["total"])
    )

    def feed(seconds: float, idle: float, own: float) -> None:
        state["wall"] += seconds
        state["own"] += own * seconds
        state["idle"] += idle * seconds * 100  # jiffies: 100 per CPU-second
        state["total"] += 2 * seconds * 100

    pool = BlasPool()
    yield pool, feed
    pool.close()


def test_the_count_follows_a_competing_process(two_cpus):
    pool, feed = two_cpus
    assert pool.cap == 2 and pool.threads_now() == 2  # no history yet: every usable CPU
    feed(0.05, idle=0.0, own=1.0)
    assert pool.threads_now() == 2  # under FIRST_WINDOW: no decision from 5 ticks
    feed(0.1, idle=0.0, own=1.0)  # a competing process appeared
    assert pool.threads_now() == 1
    assert pool.spans(1000, 64) == [(0, 1000)]
    feed(0.2, idle=1.0, own=1.0)
    assert pool.threads_now() == 1  # decisions after the first need MIN_WINDOW of history
    feed(0.4, idle=1.0, own=1.0)  # it is gone
    assert pool.threads_now() == 2
    feed(1.0, idle=0.0, own=2.0)  # lorafuse's own two threads are no competition
    assert pool.threads_now() == 2


def test_spans_cover_the_range_in_steps_and_run_side_by_side(two_cpus):
    pool, _feed = two_cpus
    assert pool.spans(1000, 64) == [(0, 512), (512, 1000)]
    assert pool.spans(100, 64) == [(0, 64), (64, 100)]
    assert pool.spans(64, 64) == [(0, 64)]  # one step: one span
    assert pool.spans(0, 64) == [(0, 0)]
    seen: dict[int, str] = {}

    def work(index: int, start: int, stop: int) -> float:
        seen[index] = threading.current_thread().name
        return float(stop - start)

    assert pool.run(pool.spans(1000, 64), work) == 1000.0
    assert seen[0] == threading.current_thread().name and seen[1].startswith("lorafuse-math")
    assert pool.run([(0, 5)], work) == 5.0


def test_lorafuse_cpus_fixes_the_count(monkeypatch):
    monkeypatch.setenv("LORAFUSE_CPUS", "1")
    monkeypatch.setattr(blas_threads, "_sample", lambda mask: pytest.fail("LORAFUSE_CPUS needs no measuring"))
    pool = BlasPool()
    assert pool.cap == 1 and pool.threads_now() == 1 and pool.spans(10_000, 64) == [(0, 10_000)]
    with pool.blas() as threads:
        assert threads == 1 and blas_threads_now() == 1


def test_blas_is_pinned_to_one_thread_and_restored():
    before = blas_threads_now()
    pool = BlasPool()
    with pool.one_thread():
        assert blas_threads_now() == 1
        with pool.blas() as threads:  # a full SVD inside the pinned stream
            assert blas_threads_now() == threads <= before
        assert blas_threads_now() == 1
    assert blas_threads_now() == before
