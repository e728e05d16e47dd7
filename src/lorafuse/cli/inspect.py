"""``lorafuse inspect PATH [--json]``: print what an adapter or a model holds."""

from __future__ import annotations

import argparse
import json

from ..serving import VLLM_DEFAULT_MAX_LORA_RANK
from . import add_adapter_format
from .extract import add_max_lora_rank, serving_rank


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an adapter (any format lorafuse reads) or a model folder / weight file")
    add_adapter_format(p, "adapter at PATH")
    p.add_argument("--base", default=None, help="base model, to resolve kohya module names against")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--serving",
        choices=["vllm"],
        default=None,
        help="say whether this engine serves the adapter as it is, each failing rule with its fix (the model's "
        "rules need the base's config.json: --base, or the local folder the adapter names)",
    )
    add_max_lora_rank(p, f"(default {VLLM_DEFAULT_MAX_LORA_RANK})")


def run(args: argparse.Namespace) -> int:
    """Show an adapter's tuner type, what each module's update is (its kind and sizes: LoRA's rank and scaling, a
    block size ...) and its norm where the base does not set it (and, with --serving, whether the engine serves
    it), or a model's layout."""
    from ..inspect import inspect_path, render

    report = inspect_path(args.path, args.adapter_format, args.base, args.serving, serving_rank(args))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
