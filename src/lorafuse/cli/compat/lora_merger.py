"""``lora-merger``: a drop-in replacement for the original merger script.

Same options and output (one file, safetensors or ``.pt``), but it streams tensor by tensor through lorafuse's
reader, plan, kernel and writers instead of holding every tensor in fp32 at once.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from ...arrays import parse_dtype
from ...edits import TargetedEdit
from ...errors import LorafuseError
from ...formats import read_adapter
from ...io.checkpoint import open_model
from ...io.extra_files import read_json
from ...io.output import AtomicOutput, OutputState, check_output
from ...merger import close_adapters, write_model
from ...names import PrefixMap
from ...plan import AdapterInput, MergePlan, build_plan, nonfinite_warning
from ...progress import ByteBar
from ...torch_bridge import check_device, require_torch
from .seed_common import DTYPE_CHOICES, TYPE_CHOICES, banner, check_model_type, output_file, run_script


def _replace_existing_file(path: Path, inputs: list[Path]) -> OutputState:
    # The original scripts replaced an existing output file; folders are never replaced, inputs never.
    return check_output(path, overwrite=path.is_file(), inputs=inputs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-merger",
        description="Merge a source model with LoRA weights to create a new model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source-model", required=True, help="Path to source model (file or folder of shards)")
    p.add_argument("--source-type", choices=TYPE_CHOICES, default="safetensors", help="Source model format type")
    p.add_argument("--lora-model", required=True, help="Path to LoRA weights")
    p.add_argument("--lora-type", choices=TYPE_CHOICES, default="safetensors", help="LoRA weights format type")
    p.add_argument("--output", required=True, help="Path to output merged model (one file)")
    p.add_argument("--output-format", choices=TYPE_CHOICES, default="safetensors", help="Output model format")
    p.add_argument("--alpha", type=float, default=1.0, help="LoRA merge strength (alpha value)")
    p.add_argument("--output-dtype", choices=DTYPE_CHOICES, default="bf16", help="Output weight data type")
    p.add_argument("--allow-unmatched", action="store_true", help="Skip LoRA keys that match no source tensor")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the merge math")
    return p


def _split_edits(
    adapter: AdapterInput, plan_keys: list[str], shapes: dict[str, tuple[int, ...]]
) -> tuple[list[TargetedEdit], list[str], list[str]]:
    """(edits that fit, LoRA keys matching no source tensor, source keys whose shape does not fit)."""
    matcher = PrefixMap(plan_keys)
    kept: list[TargetedEdit] = []
    unmatched: list[str] = []
    mismatched: list[str] = []
    for targeted in adapter.edits:
        key = matcher.resolve(targeted.target)
        if key is None:
            unmatched.append(targeted.edit.source_key)
        elif targeted.edit.shape_error(shapes[key]):
            mismatched.append(key)
        else:
            kept.append(targeted)
    return kept, unmatched, mismatched


def main(argv: Sequence[str] | None = None) -> int:
    """``lora-merger`` (the console script enters through :func:`lorafuse.cli.compat.merger_main`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run_script("lora-merger", lambda: _merge(args))


def _merge(args: argparse.Namespace) -> int:
    """``lora-merger`` itself (run by main with the shared error endings)."""
    source = check_model_type(args.source_model, args.source_type, "source model")
    lora = check_model_type(args.lora_model, args.lora_type, "lora model")
    out = output_file(args.output, args.output_format)
    banner(
        "LoRA Merger Started",
        [
            f"Source model: {source} ({args.source_type})",
            f"LoRA weights: {lora} ({args.lora_type})",
            f"Output path: {out} ({args.output_format})",
            f"Output data type: {args.output_dtype}",
            f"Merge parameters: alpha={args.alpha}",
        ],
    )
    merge_file(source, lora, out, args.alpha, args.output_dtype, args.allow_unmatched, args.device)
    return 0


def merge_file(
    source: Path,
    lora: Path,
    out: Path,
    alpha: float = 1.0,
    output_dtype: str = "bf16",
    allow_unmatched: bool = False,
    device: str = "cpu",
) -> MergePlan:
    """Merge ``lora`` into ``source`` with strength ``alpha`` and write one file (safetensors or ``.pt``), through
    the merge pipeline's plan, kernel and writers (merger.py).

    An existing output file is replaced (as the original script did); an output that is or lies inside an input
    is refused. LoRA tensors whose shape does not fit their source tensor are skipped and listed, as the original
    script did.
    """
    checked = _replace_existing_file(out, [source, lora])
    check_device(device)
    if out.suffix != ".safetensors":
        require_torch(f"a {out.suffix} output (a PyTorch pickle; --output-format safetensors needs no torch)")
    dtype = parse_dtype(output_dtype)
    checkpoint, _prefix, _ = open_model(source)
    adapter: AdapterInput | None = None
    try:
        shapes = {name: info.shape for name, info in checkpoint.infos.items()}
        adapter = read_adapter(lora, label=str(lora), weight=alpha, base_shapes=shapes)
        kept, unmatched, mismatched = _split_edits(adapter, checkpoint.keys(), shapes)
        if unmatched and not allow_unmatched:
            raise LorafuseError(
                f"{lora}: {len(unmatched)} LoRA tensors match no tensor of {source} (first: {unmatched[0]!r}); "
                "check the source model, or pass --allow-unmatched to skip them"
            )
        adapter.edits = kept
        base_config = read_json(source / "config.json") if source.is_dir() else None
        plan = build_plan(checkpoint, [adapter], dtype, base_config)
        for warning in plan.warnings:
            print(f"Warning: {warning}")
        out_format = "safetensors" if out.suffix == ".safetensors" else "bin"  # a .pt file: torch.save
        with ByteBar(plan.total_bytes, "merging") as bar, AtomicOutput(out, is_dir=False, checked=checked) as tmp:
            written = write_model(
                plan, tmp.tmp.parent, "model", 1 << 62, out_format, device, bar.update, single_file=tmp.tmp
            )
            tmp.commit()
        found = nonfinite_warning(written.nonfinite)
        if found:
            print(f"Warning: {found}")
        _print_merge_statistics(plan, kept, unmatched, mismatched)
        print(f"Merged model saved to: {out}")
        return plan
    finally:
        checkpoint.close()
        close_adapters([adapter] if adapter is not None else [])


def _print_merge_statistics(
    plan: MergePlan, kept: list[TargetedEdit], unmatched: list[str], mismatched: list[str]
) -> None:
    kinds = [t.edit.describe()["kind"] for t in kept]
    lora = sum(kind in ("lora", "dora") for kind in kinds)
    diff = kinds.count("diff")
    print("Merge statistics:")
    print(f"  Processed weights: {len(kept) + len(unmatched) + len(mismatched)}")
    print(f"  LoRA merged: {lora}")
    print(f"  Diff merged: {diff}")
    print(f"  Skipped source weights (shape mismatch): {len(mismatched)}")
    for key in mismatched:
        print(f"    {key}")
    print(f"  Skipped LoRA weights (no source tensor): {len(unmatched)}")
    for key in unmatched:
        print(f"    {key}")
    print(f"  Total merged model weights: {len(plan.tensors)}")
