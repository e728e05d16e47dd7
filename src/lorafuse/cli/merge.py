"""``lorafuse merge [BASE] ADAPTER... -o OUT``: merge adapters into a base model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..report import render_merge, source_notes
from . import add_adapter_format, progress
from .verify import add_conv1d_option
from .weight_flag import add_part_weight_flag, add_weight_flag, given_weights


def add_args(p: argparse.ArgumentParser) -> None:
    from ..sources.cli_args import SOURCES_HELP, add_source_args
    from ..writers import output_formats

    p.add_argument("base", nargs="?", metavar="BASE", help=f"base model (optional, see --base): {SOURCES_HELP}")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapters, applied in this order (same sources)")
    add_source_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (created; must not exist or be empty)")
    add_weight_flag(p)
    add_part_weight_flag(p)
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
    p.add_argument(
        "--outtype",
        default="auto",
        help="tensor type of a GGUF output: auto (bf16 or f16 as the base), f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, "
        "q5_1, tq1_0, tq2_0 (K-quants: run llama-quantize on the f16 GGUF)",
    )
    p.add_argument(
        "--requant",
        default="q8_0",
        help="merging into a .gguf base: the type of merged tensors whose own type gguf-py cannot write (K-quants, "
        "IQ types); default q8_0",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda for the merge math")
    add_adapter_format(p)
    p.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="skip adapter tensors whose target the base does not have (e.g. a kohya file's text-encoder LoRAs "
        "merged into a UNet), with a warning",
    )
    add_conv1d_option(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verify", action="store_true", help="run `lorafuse verify` on the output right after the merge")
    add_shard_args(p)


def add_shard_args(p: argparse.ArgumentParser) -> None:
    """``--executor``/``--workers``/``--address``: each output shard written by a task of its own (docs/fleets.md)."""
    from ..batch.executors import EXECUTORS

    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where the shards are written: local (this process, or --workers processes) or ray (one task per shard)",
    )
    p.add_argument("--workers", type=int, default=None, help="write the output shards in this many tasks at once")
    p.add_argument("--address", default=None, help="the Ray cluster (with --executor ray; default: RAY_ADDRESS)")


def shard_run_of(args: argparse.Namespace):
    """The shard-parallel settings the flags ask for, or None for the one-process merge."""
    from ..batch.shard_merge import ShardRun
    from ..errors import LorafuseError

    if args.workers is not None and args.workers < 1:
        raise LorafuseError(f"--workers {args.workers}: give a positive number of tasks")
    if args.executor == "local" and args.workers is None:
        if args.address is not None:
            raise LorafuseError("--address names a Ray cluster: give it with --executor ray")
        return None
    return ShardRun(args.executor, args.workers, args.address)


def run(args: argparse.Namespace) -> int:
    """Merge LoRA adapters into a base model, streaming tensor by tensor."""
    from ..errors import LorafuseError
    from ..merger import merge
    from ..pipeline import is_pipeline
    from ..sources.cli_args import chosen_base_note, merge_source_kwargs, split_base

    base, adapters = split_base(args)
    args.weight = given_weights(args)
    if args.verify and base is not None and is_pipeline(Path(base)):
        raise LorafuseError(f"--verify does not check diffusers pipeline folders yet: merge {base} without it")
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
        outtype=args.outtype,
        requant=args.requant,
        conv1d_modules=args.conv1d_modules,
        part_weights=args.part_weight,
        show_progress=progress(args),
        shard_run=shard_run_of(args),
        **merge_source_kwargs(args),
    )
    notes = [*source_notes(report.sources), *([chosen_base_note(report)] if chosen_base_note(report) else [])]
    if not args.quiet:
        for note in notes:
            print(f"lorafuse: {note}", file=sys.stderr)
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
    print("\n".join([*render_merge(report), *part_lines(report.adapters)]))
    if verification is not None:
        from ..verify import render

        print(render(verification))
        if not verification.passed:
            return verify_failed(verification)
    return 0


def part_lines(adapters: list[dict]) -> list[str]:
    """Per adapter of a diffusion model, how many LoRA modules of each part (UNet/transformer, each text encoder)
    merged and were skipped, so that a part left out shows: "unet 79 merged, text encoder 2 skipped (72 modules, not
    in the base)"."""
    lines = []
    for adapter in adapters:
        said = []
        for part, counts in adapter.get("parts", {}).items():
            merged, skipped = counts["merged"], counts["skipped"]
            if not merged:
                said.append(f"{part} skipped ({skipped} modules, not in the base)")
            else:
                said.append(
                    f"{part} {merged} merged" + (f", {skipped} skipped (no tensor in the base)" if skipped else "")
                )
        if said:
            lines.append(f"  {adapter['path']}: {'; '.join(said)}")
    return lines


def verify_failed(verification) -> int:
    """Print a failed verification's one line; exit code 1."""
    print(f"lorafuse: error: {verification.failure_message()}", file=sys.stderr)
    return 1
