"""``lora-extractor``: a drop-in replacement for the original extractor script.

Same options and output layout (the ``diffusion_model.``-prefixed single file), but it streams tensor by tensor
instead of holding every tensor in fp32 at once.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from .seed_common import DTYPE_CHOICES, TYPE_CHOICES, banner, check_model_type, output_file, run_script


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-extractor",
        description="Extract LoRA weights from the difference between source and target models",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source-model", required=True, help="Path to source model (file or folder of shards)")
    p.add_argument("--source-type", choices=TYPE_CHOICES, default="safetensors", help="Source model format type")
    p.add_argument("--target-model", required=True, help="Path to target model (fine-tuned model)")
    p.add_argument("--target-type", choices=TYPE_CHOICES, default="safetensors", help="Target model format type")
    p.add_argument("--output", required=True, help="Path to output LoRA model")
    p.add_argument("--output-format", choices=TYPE_CHOICES, default="safetensors", help="Output LoRA model format")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank value")
    p.add_argument("--output-dtype", choices=DTYPE_CHOICES, default="bf16", help="Output weight data type")
    p.add_argument(
        "--diff-only", action="store_true", help="Save all weights as direct diff without LoRA decomposition"
    )
    p.add_argument(
        "--exact-svd", action="store_true", help="Full SVD (the original script's method) instead of randomized"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda for the SVDs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lora-extractor`` (the console script enters through :func:`lorafuse.cli.compat.extractor_main`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run_script("lora-extractor", lambda: _extract(args))


def _extract(args: argparse.Namespace) -> int:
    """``lora-extractor`` itself (run by main with the shared error endings)."""
    from ...extract import extract
    from ..extract import print_statistics

    source = check_model_type(args.source_model, args.source_type, "source model")
    target = check_model_type(args.target_model, args.target_type, "target model")
    out = output_file(args.output, args.output_format)
    banner(
        "LoRA Extractor Started",
        [
            f"Source model: {source} ({args.source_type})",
            f"Target model: {target} ({args.target_type})",
            f"Output path: {out} ({args.output_format})",
            f"Output data type: {args.output_dtype}",
            f"LoRA parameters: rank={args.rank}",
            f"Diff only mode: {args.diff_only}",
        ],
    )
    report = extract(
        source,
        target,
        out,
        rank=args.rank,
        fmt="diffusion",
        dtype=args.output_dtype,
        diff_only=args.diff_only,
        exact_svd=args.exact_svd,
        device=args.device,
        overwrite=out.is_file(),
    )
    print_statistics(report)
    print(f"  Total extracted LoRA weights: {report.tensors_written}")
    for warning in report.warnings:
        print(f"Warning: {warning}")
    print(f"LoRA weights saved to: {report.output}")
    return 0
