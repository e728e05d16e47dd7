"""``merge-adapter``: a drop-in replacement for the ``merge_adapter.py`` script run in Docker builds.

Same flags and environment defaults as that script; a bare ``ORG/NAME`` base is a ModelScope id. Differences:
no model is instantiated (the base dtype is kept, so the old fp16-then-fp32 fallback is gone), and the output
and work folders are emptied only when they are empty or were made by lorafuse (else ``--overwrite``), and never
when they are, hold or lie inside an input or each other (checked before any folder is touched).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from ...errors import LorafuseError, OutputError
from ...io.output import check_output, describe_os_error, make_parents, refuse_overlap, remove_parents
from ..exits import run_guarded

PREFIX = "[merge_adapter] "
WORK_MARKER = ".lorafuse-work"  # left in work folders lorafuse made, so a re-run may empty them
OUTPUT_MARKER = "lorafuse_merge.json"  # every lorafuse merge output holds its provenance file

# flag -> (environment variable, default), as in the original script.
DEFAULTS = {
    "base_model": ("BASE_MODEL", "Qwen/Qwen3-4B"),
    "base_revision": ("BASE_REVISION", "master"),
    "cache_dir": ("MODEL_CACHE_DIR", "./model"),
    "adapter_repo_url": ("ADAPTER_REPO_URL", ""),
    "adapter_ref": ("ADAPTER_REPO_REF", ""),
    "work_dir": ("MERGE_WORK_DIR", "./merge_work"),
    "output_dir": ("MERGED_MODEL_DIR", "./merged"),
    "adapter_subfolder": ("ADAPTER_SUBFOLDER", ""),
    "dtype": ("MERGE_DTYPE", "auto"),
}


def say(message: str) -> None:
    print(PREFIX + message, flush=True)


class _StageHandler(logging.Handler):
    """Show lorafuse's own progress lines (downloads, clones, warnings) as ``[merge_adapter]`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "" if record.levelno < logging.WARNING else "warning: "
        say(level + record.getMessage())


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="merge-adapter",
        description="Merge a LoRA adapter (git/Hub/ModelScope/local) into a base model (ModelScope/Hub/local). "
        "Here a bare ORG/NAME is a ModelScope id (in `lorafuse merge` a bare ORG/NAME is a Hugging Face Hub id; "
        "write hf://ORG/NAME for the Hub here), and --base_model defaults to Qwen/Qwen3-4B (from ModelScope, "
        "revision master), as in the original script. Each flag defaults to the environment variable in brackets. "
        "Also read: ADAPTER_CONFIG_JSON, ADAPTER_CONFIG_PATH (adapter_config.json for adapters without one).",
    )

    def flag(name: str, help_text: str) -> None:
        var, default = DEFAULTS[name]
        p.add_argument(f"--{name}", default=env.get(var, default), help=f"{help_text} [{var}, default {default!r}]")

    flag(
        "base_model",
        "base model: a bare ORG/NAME is a ModelScope id here (not a Hub id as in `lorafuse merge`), hf://ORG/NAME "
        "a Hub id; or a git URL or local folder",
    )
    flag("base_revision", "base model revision (ModelScope/Hub branch, tag or commit; ignored for local folders)")
    flag("cache_dir", "download cache for the base model")
    flag("adapter_repo_url", "adapter git URL (or local folder, hf://, ms://)")
    flag("adapter_ref", "branch, tag or commit to check out (empty: the default branch)")
    flag("work_dir", "work folder; the adapter is cloned to <work_dir>/adapter_repo")
    flag("output_dir", "output folder for the merged model")
    flag("adapter_subfolder", "the adapter's folder inside the repository")
    flag("dtype", "auto (keep the base dtype), bf16, fp16 or fp32")
    p.add_argument(
        "--overwrite", action="store_true", help="empty output_dir/work_dir even if lorafuse did not make them"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of unexpected errors")
    return p


def _is_empty(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def local_inputs(*sources) -> list[Path]:
    """The local paths among parsed sources (local folders, ``file://`` git URLs): what no folder may touch."""
    paths = []
    for src in sources:
        if src.kind == "local":
            paths.append(Path(src.location).expanduser())
        elif src.kind == "git" and src.location.startswith("file://"):
            paths.append(Path(unquote(urlparse(src.location).path)))
    return paths


def check_folders(work_dir: Path, output_dir: Path, inputs: list[Path]) -> None:
    """Refuse a work or output folder that is, holds or lies inside an input, an output whose parent cannot be
    written, or work and output folders that overlap (emptying the work folder would delete the output, or the
    reverse); before either is touched."""
    refuse_overlap(work_dir, inputs, what="work_dir")
    refuse_overlap(output_dir, inputs, what="output_dir")
    check_output(output_dir, True, [])  # its parent can be written (check_output_dir: whether it may be replaced)
    work, out = Path(os.path.realpath(work_dir)), Path(os.path.realpath(output_dir))
    if work == out or work.is_relative_to(out) or out.is_relative_to(work):
        raise OutputError(
            f"work_dir {work_dir} and output_dir {output_dir} overlap (the work folder is emptied on each run): "
            "choose two separate folders"
        )


def prepare_work_dir(work_dir: Path, overwrite: bool) -> list[Path]:
    """Empty ``work_dir`` when it is empty, made by lorafuse (marker file) or ``overwrite``; else refuse.

    Returns the folders created (``work_dir`` and its missing parents, deepest first): a failed run removes them.
    """
    if work_dir.exists() and not work_dir.is_dir():
        raise OutputError(f"work_dir {work_dir} is a file: choose a folder path")
    if work_dir.is_dir() and not _is_empty(work_dir):
        if not (work_dir / WORK_MARKER).is_file() and not overwrite:
            raise OutputError(
                f"work_dir {work_dir} is not empty and was not made by lorafuse: choose another --work_dir or "
                "pass --overwrite to empty it"
            )
    made: list[Path] = []
    try:
        if work_dir.is_dir() and not _is_empty(work_dir):
            shutil.rmtree(work_dir)
            work_dir.mkdir()
        made = make_parents(work_dir)
        (work_dir / WORK_MARKER).write_text("made by lorafuse merge-adapter; emptied on the next run\n")
        return made
    except OSError as exc:
        remove_created(made)
        raise OutputError(describe_os_error(exc, work_dir, what="the work_dir")) from exc


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Allow replacing ``output_dir`` only when it is empty, a lorafuse output, or with ``overwrite``."""
    if not output_dir.exists() or _is_empty(output_dir) or overwrite:
        return
    if output_dir.is_dir() and (output_dir / OUTPUT_MARKER).is_file():
        return
    raise OutputError(
        f"output_dir {output_dir} is not empty and was not made by lorafuse: choose another --output_dir or pass "
        "--overwrite to replace it"
    )


def remove_created(made: list[Path]) -> None:
    """Remove the work folder and parents this run created (``made``, deepest first), after a failure."""
    if made and made[0].is_dir():
        shutil.rmtree(made[0], ignore_errors=True)
    remove_parents(made)


def run(args: argparse.Namespace) -> int:
    from ...merger import merge
    from ...sources import parse_source
    from ...sources.resolve import fetch

    if not args.adapter_repo_url:
        raise LorafuseError("no adapter given: set ADAPTER_REPO_URL or pass --adapter_repo_url")
    if not args.base_model:
        raise LorafuseError("no base model given: set BASE_MODEL or pass --base_model")
    base_src = parse_source(args.base_model, default_hub="ms")
    revision = args.base_revision or None
    if base_src.kind == "local" and revision:
        if revision != DEFAULTS["base_revision"][1]:
            say(f"base model {args.base_model} is a local folder: base_revision {revision!r} is not used")
        revision = None
    elif base_src.kind == "hf" and revision == DEFAULTS["base_revision"][1]:
        revision = None  # ModelScope's default branch name; the Hub's is "main"
    work_dir, output_dir = Path(args.work_dir), Path(args.output_dir)
    # Every check before the work folder is emptied or created: local inputs exist, no folder overlaps another.
    adapter_src = parse_source(args.adapter_repo_url, default_hub="ms")
    for src, role, cloned in ((base_src, "model", False), (adapter_src, "adapter", bool(args.adapter_ref))):
        if src.kind == "local" and not src.revision and not cloned:
            fetch(src, role=role)  # for a local path: only checks that it exists (the merge's own message)
    check_folders(work_dir, output_dir, local_inputs(base_src, adapter_src))
    check_output_dir(output_dir, args.overwrite)
    made = prepare_work_dir(work_dir, args.overwrite)
    where = f" (revision {revision})" if revision else ""
    say(f"base model: {args.base_model}{where}" + ("" if base_src.kind == "local" else f", cache {args.cache_dir}"))
    say(f"adapter: {args.adapter_repo_url}" + (f" at {args.adapter_ref}" if args.adapter_ref else ""))
    try:
        report = merge(
            args.base_model,
            [args.adapter_repo_url],
            output_dir,
            dtype=args.dtype,
            overwrite=True,  # checked above with merge-adapter's own rule
            show_progress=False,
            adapter_ref=args.adapter_ref or None,
            adapter_subfolder=args.adapter_subfolder or None,
            cache_dir=args.cache_dir or None,
            base_revision=revision,
            work_dir=work_dir,
            default_hub="ms",
        )
    except BaseException:
        remove_created(made)  # a work folder that existed before stays (emptied), as a successful run leaves it
        raise
    say(
        f"merged {report.tensors_touched} of {report.tensors_total} tensors (dtype {report.dtype}) into "
        f"{output_dir}: {', '.join(report.files + report.copied_files)}"
    )
    say(f"done in {report.seconds:.1f} s")
    return 0


def _run_or_unexpected(args: argparse.Namespace) -> int:
    """``run``, with any exception that is not a LorafuseError, an OSError or an interrupt as one FAILED line."""
    try:
        return run(args)
    except (LorafuseError, OSError, KeyboardInterrupt):
        raise  # one line each, in main
    except Exception as exc:  # the script contract: every failure is one FAILED line and exit status 1
        if args.verbose:
            import traceback

            traceback.print_exc()
        say(f"FAILED: unexpected {type(exc).__name__}: {exc}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``merge-adapter`` console script: exit 0 on success, 1 (with a FAILED line) on failure,
    130 on Ctrl-C and 143 on SIGTERM (the output folder unchanged, the temporary one removed)."""
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("lorafuse")
    handler = _StageHandler()
    logger.addHandler(handler)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return run_guarded(
            lambda: _run_or_unexpected(args),
            lambda message: say(f"FAILED: {message}"),
            lambda verb: say(f"FAILED: {verb}; the output folder was not changed"),
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


if __name__ == "__main__":
    sys.exit(main())
