"""The ``lorafuse`` command: one module per sub-command in this package, each with ``add_args(parser)`` and
``run(args) -> int`` (parse, call the library, print); ``compat/`` holds the seed-compatible commands.

Importing this package loads neither numpy nor torch: :func:`main` first sizes the thread pools
(:func:`~lorafuse.cpus.calm_thread_pools`, which must run before numpy loads), then builds the parser.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from .. import __version__
from ..cpus import calm_thread_pools
from .exits import run_guarded
from .weight_flag import weights_apart

__all__ = ["build_parser", "main", "run_guarded"]

# Sub-command -> module of this package, in the order `lorafuse --help` lists them.
COMMANDS = {
    "merge": "merge",
    "extract": "extract",
    "inspect": "inspect",
    "verify": "verify",
    "combine": "combine",
    "convert": "convert",
    "batch": "batch",
}


def adapter_formats() -> tuple[str, ...]:
    """The choices of ``--adapter-format`` (the format of adapters a command reads): the registered formats."""
    from ..formats import registered_formats

    return registered_formats()


def add_adapter_format(p: argparse.ArgumentParser, what: str = "adapters") -> None:
    """``--adapter-format``: the format of the adapters a command READS (``--format`` is what it writes)."""
    p.add_argument(
        "--adapter-format",
        choices=adapter_formats(),
        default=None,
        help=f"read the {what} as this format instead of detecting it",
    )


def progress(args: argparse.Namespace) -> bool | None:
    """``show_progress`` for the library: off with ``-q``, else None (bars when stderr is a terminal)."""
    return False if args.quiet else None


def _log_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log details to stderr")
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars and no warnings (errors stay)"
    )


def _module(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    """The ``lorafuse`` parser with every sub-command. ``-v``/``-q`` are accepted before or after the sub-command:
    the sub-parsers' copies default to SUPPRESS so that they do not reset a flag given before it."""
    parser = argparse.ArgumentParser(prog="lorafuse", description="Merge, extract, inspect and verify LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    _log_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _module(name)
        summary = (module.run.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=summary)
        module.add_args(p)
        _log_flags(p, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorafuse`` console script; with no arguments it prints the help and exits 0."""
    calm_thread_pools()  # before any sub-command module loads numpy: the BLAS pool reads these variables then
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(weights_apart(argv))
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet contradict each other: give one")
    # -q: warnings off, errors on (they are LorafuseErrors, printed below whatever the level).
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(format="%(levelname)s: %(message)s")
    logger = logging.getLogger("lorafuse")
    old_level = logger.level
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            if args.quiet:
                warnings.simplefilter("ignore")  # the library's warnings.warn ones too (combine's)
            return run_guarded(
                lambda: _module(args.command).run(args),
                lambda message: print(f"lorafuse: error: {message}", file=sys.stderr),
                lambda verb: print(f"lorafuse: {verb}; nothing was written to the output", file=sys.stderr),
            )
    finally:
        logger.setLevel(old_level)  # main() also runs inside other programs (and tests): leave logging as found
