"""``lorafuse inspect PATH [--json]``: print what an adapter or a model holds."""

from __future__ import annotations

import argparse
import json

from . import add_adapter_format


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an adapter (any format lorafuse reads) or a model folder / weight file")
    add_adapter_format(p, "adapter at PATH")
    p.add_argument("--base", default=None, help="base model, to resolve kohya module names against")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Show an adapter's ranks, scalings and per-module update norms, or a model's layout."""
    from ..inspect import inspect_path, render

    report = inspect_path(args.path, args.adapter_format, args.base)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
