"""``lorafuse verify MERGED [--base BASE --adapter A [--adapter B ...] [--weight W ...]] [--json]``: without
``--adapter``, against the merge MERGED/lorafuse_merge.json records."""

from __future__ import annotations

import argparse
import json
import sys

from . import add_adapter_format, progress
from .weight_flag import add_weight_flag, given_weights


def add_verify_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``verify`` and ``merge --verify``."""
    p.add_argument("--max-ulp", type=float, default=None, help="allowed error in ulps of the merged dtype (default 1)")
    p.add_argument("--no-output-check", action="store_true", help="skip the transformers output-level check")
    p.add_argument("--prompt", action="append", help="prompt for the output-level check (default: random token ids)")


def add_conv1d_option(p: argparse.ArgumentParser) -> None:
    """``--conv1d-modules``, shared by ``merge`` and ``verify``."""
    p.add_argument(
        "--conv1d-modules",
        metavar="NAMES",
        help="the base's GPT-2 Conv1D modules, comma-separated (c_attn,c_proj,c_fc), or none: needed to orient "
        "square LoRA updates when the base has no config.json that tells (a single .safetensors file, custom code)",
    )


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("merged", help="the merged model folder or .safetensors file")
    p.add_argument(
        "--base",
        help="the base model the adapters were merged into: a path, Hub/ModelScope id or git URL "
        "(default: the base named in the first adapter's adapter_config.json)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        help="an adapter (a path or source), once each, in merge order (default: the base, adapters and weights "
        "MERGED/lorafuse_merge.json records; their files must be unchanged)",
    )
    p.add_argument("--cache-dir", help="download cache for Hub/ModelScope sources (default: the hubs' own caches)")
    add_weight_flag(p)
    add_adapter_format(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda for the recomputation")
    p.add_argument("--allow-unmatched", action="store_true", help="skip adapter tensors the base has no target for")
    add_conv1d_option(p)
    add_verify_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_verification(
    merged: str,
    base: str | None,
    adapters: list[str],
    weights: list[float] | None,
    args: argparse.Namespace,
    as_json: bool,
) -> int:
    """Verify, print the report, and return the exit code (1 when beyond tolerance)."""
    from ..verify import DEFAULT_MAX_ULP, render, verify

    report = verify(
        merged,
        base,
        adapters,
        weights=weights,
        adapter_format=getattr(args, "adapter_format", None),
        max_ulp=DEFAULT_MAX_ULP if getattr(args, "max_ulp", None) is None else args.max_ulp,
        outputs=not getattr(args, "no_output_check", False),
        prompts=getattr(args, "prompt", None),
        device=getattr(args, "device", "cpu"),
        cache_dir=getattr(args, "cache_dir", None),
        allow_unmatched=getattr(args, "allow_unmatched", False),
        conv1d_modules=getattr(args, "conv1d_modules", None),
        show_progress=False if getattr(args, "quiet", False) else None,  # compat commands have no --quiet
    )
    print(json.dumps(report.to_dict(), indent=2) if as_json else render(report))
    if not report.passed:
        print(f"lorafuse: error: {report.failure_message()}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Check a merged model against base + adapters (weights, and outputs when transformers can load it)."""
    return run_verification(args.merged, args.base, args.adapter, given_weights(args), args, args.json)


def verify_after_merge(args: argparse.Namespace):
    """``lorafuse merge --verify``: verify the merge just written, with the merge's own arguments."""
    from ..verify import verify

    return verify(
        args.output,
        args.base,
        args.adapters,
        weights=args.weight,
        adapter_format=args.adapter_format,
        device=args.device,
        allow_unmatched=args.allow_unmatched,
        conv1d_modules=args.conv1d_modules,
        show_progress=progress(args),
        part_weights=args.part_weight,
    )
