"""``lorafuse merge [BASE] ADAPTER... -o OUT``: merge adapters into a base model."""

from __future__ import annotations

import argparse
import json
import sys

from . import add_adapter_format, human_bytes, progress
from .weight_flag import add_weight_flag, given_weights


def add_args(p: argparse.ArgumentParser) -> None:
    from ..sources.cli_args import SOURCES_HELP, add_source_args
    from ..writers import output_formats

    p.add_argument("base", nargs="?", metavar="BASE", help=f"base model (optional, see --base): {SOURCES_HELP}")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapters, applied in this order (same sources)")
    add_source_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (created; must not exist or be empty)")
    add_weight_flag(p)
    p.add_argument("--dtype", default="auto", help="auto (keep each tensor's dtype), bf16, fp16 or fp32")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    formats = output_formats()
    p.add_argument(
        "--format",
        "--out-format",
        dest="out_format",
        choices=formats,
        default=formats[0],
        help=f"format of the merged model written (default {formats[0]}; --out-format is an alias)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda for the merge math")
    add_adapter_format(p)
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


def run(args: argparse.Namespace) -> int:
    """Merge LoRA adapters into a base model, streaming tensor by tensor."""
    from ..merger import merge
    from ..sources.cli_args import chosen_base_note, merge_source_kwargs, split_base

    base, adapters = split_base(args)
    args.weight = given_weights(args)
    report = merge(
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
        allow_unmatched=args.allow_unmatched,
        show_progress=progress(args),
        **merge_source_kwargs(args),
    )
    if chosen_base_note(report) and not args.quiet:
        print(f"lorafuse: {chosen_base_note(report)}", file=sys.stderr)
    # Local paths of what was merged (downloads, clones), for --verify.
    args.base, args.adapters = report.base, [a["path"] for a in report.adapters]
    verification = None
    if args.verify and not report.dry_run:
        from .verify import verify_after_merge

        verification = verify_after_merge(args)
    if args.json:
        data = report.to_dict()
        if verification is not None:
            data["verify"] = verification.to_dict()
        print(json.dumps(data, indent=2))
        return 0 if verification is None or verification.passed else verify_failed(verification)
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
        from ..verify import render

        print(render(verification))
        if not verification.passed:
            return verify_failed(verification)
    return 0


def verify_failed(verification) -> int:
    """Print a failed verification's one line; exit code 1."""
    print(f"lorafuse: error: {verification.failure_message()}", file=sys.stderr)
    return 1
