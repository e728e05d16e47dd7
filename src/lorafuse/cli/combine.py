"""``lorafuse combine A1 A2 ... -o OUT --method cat|linear|svd``: one adapter from several."""

from __future__ import annotations

import argparse
import json

from . import add_adapter_format, progress
from .weight_flag import add_weight_flag, given_weights

WRITES = ("peft",)  # the adapter format combine writes (combine.combine writes PEFT only)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapters to combine (any format lorafuse reads)")
    p.add_argument("-o", "--output", required=True, help="output adapter folder (must not exist or be empty)")
    p.add_argument(
        "--method",
        choices=["cat", "linear", "svd"],
        default="cat",
        help="cat: exact, rank = sum of ranks (default); linear: PEFT's linear mix, equal ranks; "
        "svd: weighted sum truncated to --rank",
    )
    add_weight_flag(p, "--weights")  # --weights: the flag's first spelling, kept as an alias
    p.add_argument("--rank", type=int, default=None, help="rank of the svd result (default: the largest input rank)")
    p.add_argument("--dtype", default="fp32", help="dtype of the stored factors: fp32 (default), bf16, fp16 or auto")
    p.add_argument("--format", choices=WRITES, default=WRITES[0], help="format of the adapter written (peft)")
    p.add_argument("--base", default=None, help="base model, to resolve kohya module names against")
    add_adapter_format(p, "input adapters")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Combine several LoRA adapters into one (cat, linear or svd), loadable by PEFT."""
    from ..combine import combine

    report = combine(
        args.adapters,
        args.output,
        method=args.method,
        weights=given_weights(args),
        rank=args.rank,
        dtype=args.dtype,
        overwrite=args.overwrite,
        adapter_format=args.adapter_format,
        base=args.base,
        show_progress=progress(args),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(
        f"wrote {report.output}: {len(report.adapters)} adapters combined by {report.method} into rank {report.rank} "
        f"on {report.modules} modules ({report.dtype})"
    )
    if report.svd_error_max is not None:
        print(
            f"svd truncation error (||D - BA|| / ||D||): max {report.svd_error_max:.3g} "
            f"({report.svd_worst_module}), mean {report.svd_error_mean:.3g}"
        )
    return 0
