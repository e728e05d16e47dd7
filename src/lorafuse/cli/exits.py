"""The endings every console script shares: error-to-exit-code wrapper and signal handling (issue 15).

A LorafuseError or an unhandled OSError is one line and exit 1; Ctrl-C 130, SIGTERM 143 (128 + the signal, as a
shell reports it); stdout closed early (``| head``) 141, as a tool stopped by SIGPIPE.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import LorafuseError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that ``kill`` runs the same clean-up as Ctrl-C."""


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process stopped by it: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """While the body runs, SIGTERM raises :class:`Terminated` and Ctrl-C ``KeyboardInterrupt``; a second signal
    during the clean-up that follows is ignored, so that the temporary output is removed (SIGKILL still stops it).
    Signals a parent process set to be ignored stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in wanted}

    def on_signal(signum: int, _frame: object) -> None:
        for sig in wanted:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def stdout_closed() -> int:
    """stdout was closed early (``| head``): point it at /dev/null so that the flush at exit cannot fail again, and
    exit as a tool stopped by SIGPIPE would (the Python docs' recipe for BrokenPipeError)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def run_guarded(body: Callable[[], int], fail: Callable[[str], None], interrupted: Callable[[str], None]) -> int:
    """Run a console script's ``body`` with the endings all of them share: a LorafuseError is one line (``fail``)
    and exit 1; Ctrl-C or SIGTERM one line (``interrupted``, given "interrupted" or "terminated") and exit 130 or
    143; a closed stdout a quiet exit 141. An OSError that got here unhandled is one line too, the last resort
    (the code that writes turns its own into OutputErrors naming the output first)."""
    with interrupts_raise():
        try:
            code = body()
            sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
            return code
        except BrokenPipeError:
            return stdout_closed()
        except LorafuseError as exc:
            fail(str(exc))
            return 1
        except KeyboardInterrupt as exc:
            interrupted("terminated" if isinstance(exc, Terminated) else "interrupted")
            return interrupt_exit_code(exc)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            fail(f"{exc.filename}: {reason}" if exc.filename else reason)
            return 1
