"""``lorafuse extract BASE TUNED -o OUT --rank R``: an adapter from the difference of two models."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..errors import LorafuseError
from ..report import format_bytes
from ..serving import VLLM_DEFAULT_MAX_LORA_RANK, VLLM_MAX_LORA_RANKS
from . import progress

if TYPE_CHECKING:
    from ..extract import ExtractReport

LEFT_OUT_LISTED = 10  # left-out tensors named in the text report (at least; --show-tensors raises it)


def add_args(p: argparse.ArgumentParser) -> None:
    from ..formats.registry import written_formats

    p.add_argument("base", help="base model folder or .safetensors/.pt file")
    p.add_argument("tuned", help="fine-tuned model (same tensor names)")
    p.add_argument("-o", "--output", required=True, help="adapter folder (peft) or file (diffusion, kohya)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (the cap with --energy; default 16)")
    p.add_argument(
        "--format", dest="fmt", choices=written_formats(), default="peft", help="format of the adapter written"
    )
    p.add_argument("--energy", type=float, default=None, help="dynamic rank: keep this fraction of each delta's energy")
    p.add_argument("--exact-svd", action="store_true", help="full SVD instead of randomized SVD")
    p.add_argument("--oversample", type=int, default=8, help="randomized SVD oversampling (default 8)")
    p.add_argument(
        "--power-iters",
        type=_power_iters,
        default="auto",
        metavar="auto|N",
        help="randomized SVD power iterations: N, or auto (default): per tensor, as few as keep the predicted error "
        "within ~1.0025x of the optimal rank-R error, at most 2",
    )
    p.add_argument(
        "--min-params",
        type=int,
        default=None,
        help="--format diffusion/kohya: smaller tensors are stored as full differences (default 1000000); a PEFT "
        "adapter factorises every changed 2-D weight",
    )
    p.add_argument("--diff-only", action="store_true", help="store every changed tensor as a full difference (exact)")
    p.add_argument(
        "--keep-full",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="tensors or modules (names or fnmatch patterns, e.g. '*norm*') whose changes are stored whole: in PEFT "
        "format their modules become modules_to_save (without it, changes a LoRA cannot hold are left out and "
        "reported with their share of the change)",
    )
    p.add_argument(
        "--serving",
        choices=["vllm"],
        default=None,
        help="write only what this engine serves (vLLM: no modules_to_save or lora_bias, its LoRA modules for the "
        "base's architecture), report what was left out and its error, and check the adapter against its rules",
    )
    ranks = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
    add_max_lora_rank(p, f"(one of {ranks}; default {VLLM_DEFAULT_MAX_LORA_RANK}); --rank must not exceed it")
    p.add_argument("--dtype", default="auto", help="auto (factors in the model's dtype, diffs fp32), bf16, fp16, fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the SVDs")
    p.add_argument("--base-name", default=None, help="base_model_name_or_path for adapter_config.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--show-tensors", type=int, default=5, help="list this many tensors with the largest error")


def _power_iters(value: str) -> int | str:
    """``auto`` or a count >= 0 (as extract.parse_power_iters, without importing numpy)."""
    if value.strip().lower() == "auto":
        return "auto"
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be 'auto' or a count >= 0 (got {value!r})")
    return int(value)


def print_statistics(report: ExtractReport, show_tensors: int = 5, file=None) -> None:
    """The old extractor's counters, then the approximation error overall and for the worst tensors."""
    file = file or sys.stdout
    print("Extraction statistics:", file=file)
    print(f"  Processed weights: {report.processed}", file=file)
    print(f"  Direct diff: {report.direct_diff}", file=file)
    print(f"  LoRA decomposition: {report.lora}", file=file)
    print(f"  Skipped weights: {report.skipped}", file=file)
    print(f"  Similar weights: {report.similar}", file=file)
    print(f"  Failed weights: {report.failed}", file=file)
    if report.tied:
        print(f"  Tied weights (stored once): {report.tied}", file=file)
    print(f"  Tensors written: {report.tensors_written} ({format_bytes(report.adapter_bytes)} tensor bytes)", file=file)
    print(f"  Relative Frobenius error (overall): {report.rel_error:.3e}", file=file)
    lossy = sorted((t for t in report.tensors if t.kind == "lora"), key=lambda t: -t.rel_error)[:show_tensors]
    for t in lossy:
        print(f"    {t.name}: rank {t.rank}, relative error {t.rel_error:.3e}", file=file)
    for t in report.tensors:
        if t.kind in ("failed", "skipped"):
            print(f"  {t.kind}: {t.name} ({t.note})", file=file)
    print_left_out(report, max(show_tensors, LEFT_OUT_LISTED), file)
    if report.serving is not None:
        from ..serving import render_verdict

        for line in render_verdict(report.serving):
            print(f"  {line}", file=file)


def print_left_out(report: ExtractReport, limit: int, file) -> None:
    """The changed tensors not in the adapter, largest share of the change first, and the error they cost."""
    left = sorted((t for t in report.tensors if t.kind == "left_out"), key=lambda t: -t.share)
    if not left:
        return
    total = sum(t.share for t in left)
    print(
        f"  Left out (changed, not in the adapter): {len(left)} tensors, {100 * total:.3g}% of ||delta||^2; "
        f"relative error they cost: {report.left_out_error:.3e}",
        file=file,
    )
    for t in left[:limit]:
        print(f"    {t.name}: {100 * t.share:.3g}% ({t.note})", file=file)
    if len(left) > limit:
        print(f"    ... and {len(left) - limit} more (--json lists every tensor)", file=file)


def add_max_lora_rank(p: argparse.ArgumentParser, detail: str) -> None:
    """``--max-lora-rank N`` (alias ``--max-rank``), read by :func:`serving_rank`; ``detail`` ends its help."""
    p.add_argument(
        "--max-lora-rank",
        "--max-rank",
        type=int,
        default=None,
        metavar="N",
        help=f"with --serving vllm: the server's --max-lora-rank {detail}",
    )


def serving_rank(args: argparse.Namespace) -> int:
    """``--max-lora-rank``, which means something only with ``--serving`` (default: vLLM's own default)."""
    if args.max_lora_rank is not None and args.serving is None:
        raise LorafuseError("--max-lora-rank applies with --serving vllm only: add --serving vllm or drop it")
    return VLLM_DEFAULT_MAX_LORA_RANK if args.max_lora_rank is None else args.max_lora_rank


def run(args: argparse.Namespace) -> int:
    """Extract the difference between a tuned model and its base as a LoRA adapter."""
    from ..extract import extract

    max_lora_rank = serving_rank(args)
    report = extract(
        args.base,
        args.tuned,
        args.output,
        rank=args.rank,
        fmt=args.fmt,
        energy=args.energy,
        exact_svd=args.exact_svd,
        device=args.device,
        min_params=args.min_params,
        diff_only=args.diff_only,
        dtype=args.dtype,
        oversample=args.oversample,
        power_iters=args.power_iters,
        seed=args.seed,
        overwrite=args.overwrite,
        base_name=args.base_name,
        show_progress=progress(args),
        keep_full=args.keep_full,
        serving=args.serving,
        max_lora_rank=max_lora_rank,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"wrote {report.output} ({report.format}, rank {report.rank}) in {report.seconds:.1f} s")
    print_statistics(report, args.show_tensors)
    for warning in [] if args.quiet else report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
