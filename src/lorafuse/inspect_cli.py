"""``lorafuse inspect PATH [--json]``: print what an adapter or a model holds."""

from __future__ import annotations

import argparse
import json

from .cli import command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an adapter (any format lorafuse reads) or a model folder / weight file")
    p.add_argument("--adapter-format", default=None, help="read PATH as an adapter of this format")
    p.add_argument("--base", default=None, help="base model, to resolve kohya module names against")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command("inspect")(add_args)
def run_inspect(args: argparse.Namespace) -> int:
    """Show an adapter's ranks, scalings and per-module update norms, or a model's layout."""
    from .inspect import inspect_path, render

    report = inspect_path(args.path, args.adapter_format, args.base)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
