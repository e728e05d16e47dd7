"""The one progress bar a long command shows: bytes done, rate and time left, on a terminal only.

``show=None`` lets tqdm decide (a bar when stderr is a terminal, nothing otherwise: a pipe or a log file gets the
result only); ``show=False`` is ``--quiet``. Updates may come from several threads (the merge kernel's pool, the
prefill's copy thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

from .report import format_bytes

# Sizes as every other line lorafuse prints them (report.format_bytes), not tqdm's own "181k".
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done} of {size} [{elapsed}<{remaining}, {speed}]"


class _BytesBar(tqdm):
    @property
    def format_dict(self) -> dict:
        values = super().format_dict
        rate = values["rate"] or (values["n"] / values["elapsed"] if values["elapsed"] else None)
        values.update(
            done=format_bytes(values["n"]),
            size=format_bytes(values["total"] or 0),
            speed=f"{format_bytes(rate)}/s" if rate else "? B/s",
        )
        return values


class ByteBar:
    """A bar of ``total`` bytes labelled ``desc``; use as a context manager (the bar is cleared when done)."""

    def __init__(self, total: int, desc: str, show: bool | None = None):
        self._lock = threading.Lock()
        self._bar = _BytesBar(
            total=total,
            desc=desc,
            unit="B",
            bar_format=BAR_FORMAT,
            disable=None if show is None else not show,
            leave=False,
            dynamic_ncols=True,
        )

    def update(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    def close(self) -> None:
        with self._lock:
            self._bar.close()

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class PrefillProgress:
    """The bytes the merge's prefill (io/prefill.py) copies, passed on to the merge's bar for the tensors the
    kernel leaves in place (the kernel counts every other tensor itself).

    The copy starts before the plan, and so before the bar, exists: what it copies until :meth:`attach` is held
    back, and copies of tensors the kernel rewrites anyway are not counted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._update: Callable[[int], None] | None = None
        self._counted: set[str] = set()

    def copied(self, name: str, nbytes: int) -> None:
        """``nbytes`` more of tensor ``name`` are in place (called from the prefill's thread)."""
        with self._lock:
            if self._update is None:
                self._pending[name] = self._pending.get(name, 0) + nbytes
            elif name in self._counted:
                self._update(nbytes)

    def attach(self, update: Callable[[int], None], counted: set[str]) -> None:
        """Pass the copies of the tensors ``counted`` to ``update`` (a bar's) from now on, those made so far
        included."""
        with self._lock:
            self._update, self._counted = update, counted
            update(sum(n for name, n in self._pending.items() if name in counted))
            self._pending.clear()

    def detach(self) -> None:
        """Stop counting (the bar is about to close)."""
        with self._lock:
            self._update = None
            self._counted = set()
