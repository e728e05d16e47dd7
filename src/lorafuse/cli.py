"""The ``lorafuse`` command. Thin: parse arguments, call the Python API, print the result."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import __version__
from .errors import LorafuseError

if TYPE_CHECKING:
    from .io.prefill import Prefill
    from .report import MergeReport

log = logging.getLogger("lorafuse")
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str):
    """Register a sub-command: ``add_args(parser)`` fills the parser, the decorated function runs it."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = (add_args, run)
            return run

        return register

    return wrap


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _merge_args(p: argparse.ArgumentParser) -> None:
    from .sources.cli_args import SOURCES_HELP, add_source_args

    p.add_argument("base", nargs="?", metavar="BASE", help=f"base model (optional, see --base): {SOURCES_HELP}")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapters, applied in this order (same sources)")
    add_source_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (created; must not exist or be empty)")
    p.add_argument("--weight", type=float, action="append", help="strength of each adapter, once per adapter")
    p.add_argument("--dtype", default="auto", help="auto (keep each tensor's dtype), bf16, fp16 or fp32")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--format", dest="out_format", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the merge math")
    p.add_argument(
        "--adapter-format",
        default=None,
        help="force the adapter format: peft, kohya, diffusion or plain (default: detect)",
    )
    p.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="skip adapter tensors whose target the base does not have (e.g. a kohya file's text-encoder LoRAs "
        "merged into a UNet), with a warning",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verify", action="store_true", help="run `lorafuse verify` on the output right after the merge")


@command("merge")(_merge_args)
def run_merge(args: argparse.Namespace) -> int:
    from .sources.cli_args import split_base

    base, adapters = split_base(args)
    prefill = None
    wanted = os.environ.get("LORAFUSE_PREFILL", "1") != "0"  # LORAFUSE_PREFILL=0 turns it off
    if wanted and not args.dry_run and args.out_format == "safetensors" and args.dtype == "auto" and base is not None:
        # Before `import torch` (in merger.py): copy the base into the output meanwhile (io/prefill.py).
        from .io.prefill import speculate

        prefill = speculate(base, args.output, args.max_shard_size, args.overwrite, adapters)
    try:
        return _merge_and_report(args, base, adapters, prefill)
    finally:
        if prefill is not None:
            prefill.discard()


def _fast_path_applies(args: argparse.Namespace) -> bool:
    """The torch-free fast path (fastpath.py) may try this merge: nothing asked for that only the torch path does."""
    sources = (args.adapter_ref, args.adapter_subfolder, args.adapter_config, args.cache_dir, args.base_revision)
    return (
        os.environ.get("LORAFUSE_FASTPATH", "1") != "0"  # LORAFUSE_FASTPATH=0 turns it off
        and args.device == "cpu"
        and args.adapter_format in (None, "peft")
        and all(value is None for value in sources)
    )


def _torch_merge(
    args: argparse.Namespace, base: str | None, adapters: list[str], prefill: Prefill | None, sources: dict
) -> MergeReport:
    from .merger import merge  # imports torch

    return merge(
        base,
        adapters,
        args.output,
        weights=args.weight,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        out_format=args.out_format,
        device=args.device,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        adapter_format=args.adapter_format,
        prefill=prefill,
        allow_unmatched=args.allow_unmatched,
        **sources,
    )


def _merge_and_report(args: argparse.Namespace, base: str | None, adapters: list[str], prefill: Prefill | None) -> int:
    from .sources.cli_args import chosen_base_note, merge_source_kwargs

    report = None
    if prefill is not None and base is not None and _fast_path_applies(args):
        from .fastpath import fast_merge

        report = fast_merge(base, adapters, args.output, args.weight, prefill)
    if report is None:
        report = _torch_merge(args, base, adapters, prefill, merge_source_kwargs(args))
    if chosen_base_note(report):
        print(f"lorafuse: {chosen_base_note(report)}", file=sys.stderr)
    # Local paths of what was merged (downloads, clones), for --verify.
    args.base, args.adapters = report.base, [a["path"] for a in report.adapters]
    verification = None
    if args.verify and not report.dry_run:
        from .verify_cli import verify_after_merge

        verification = verify_after_merge(args)
    if args.json:
        data = report.to_dict()
        if verification is not None:
            data["verify"] = verification.to_dict()
        print(json.dumps(data, indent=2))
        return 0 if verification is None or verification.passed else _verify_failed(verification)
    verb = "would write" if report.dry_run else "wrote"
    print(
        f"{verb} {report.output}: {report.tensors_touched} of {report.tensors_total} tensors changed by "
        f"{len(report.adapters)} adapter(s), {human_bytes(report.total_bytes)} in {len(report.files)} file(s), "
        f"dtype {report.dtype}" + ("" if report.dry_run else f", {report.seconds:.1f} s")
    )
    if report.dry_run:
        for name in report.files:
            print(f"  {name}")
    if verification is not None:
        from .verify import render

        print(render(verification))
        if not verification.passed:
            return _verify_failed(verification)
    return 0


def _verify_failed(verification) -> int:
    print(f"lorafuse: error: {verification.failure_message()}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafuse", description="Merge, extract, inspect and verify LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _run) in COMMANDS.items():
        add_args(sub.add_parser(name, help=(_run.__doc__ or "").strip().splitlines()[0] if _run.__doc__ else None))
    return parser


def _load_commands() -> None:
    """Import the modules that register further sub-commands (each optional feature registers itself)."""
    import importlib

    for module in ("extract_cli", "inspect_cli", "verify_cli", "combine_cli"):
        try:
            importlib.import_module(f"lorafuse.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lorafuse.{module}":
                raise


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
    143; a closed stdout a quiet exit. An OSError that got here unhandled is one line too (the code that writes
    turns its own into OutputErrors naming the output first)."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorafuse`` console script."""
    _load_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    return run_guarded(
        lambda: COMMANDS[args.command][1](args),
        lambda message: print(f"lorafuse: error: {message}", file=sys.stderr),
        lambda verb: print(f"lorafuse: {verb}; nothing was written to the output", file=sys.stderr),
    )


if __name__ == "__main__":
    # Sub-command modules register into the importable ``lorafuse.cli``, not into this ``__main__`` copy.
    from lorafuse.cli import main as package_main

    sys.exit(package_main())
