"""``lora-extractor`` and ``lora-merger``: drop-in replacements for the original extractor/merger scripts.

Same options and output layout (the ``diffusion_model.``-prefixed single file), but both stream tensor by tensor
through lorafuse's reader, plan and engine instead of holding every tensor in fp32 at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .cli import run_guarded
from .dtypes import parse_dtype
from .edits import FullDiff, LoraDelta, TargetedEdit
from .engine import compute_tensor, write_safetensors
from .errors import InputError, LorafuseError
from .formats import read_adapter
from .io.checkpoint import PICKLE_SUFFIXES, open_model
from .io.extra_files import read_json
from .io.output import AtomicOutput, OutputState, check_output, save_torch_file
from .keymatch import KeyMatcher
from .plan import AdapterInput, MergePlan, build_plan

log = logging.getLogger("lorafuse")
DTYPE_CHOICES = ["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]
TYPE_CHOICES = ["safetensors", "pytorch"]


def output_file(path: str, output_format: str) -> Path:
    """The output path with ``.safetensors`` / ``.pt`` appended when missing, as the original scripts did."""
    if output_format == "safetensors":
        return Path(path if path.endswith(".safetensors") else path + ".safetensors")
    return Path(path if path.endswith((".pt", ".pth")) else path + ".pt")


def check_model_type(path: str, model_type: str, what: str) -> Path:
    """A model path (file or folder of shards) whose file type agrees with ``--*-type``."""
    model = Path(path)
    if not model.exists():
        raise InputError(f"{what} {model} does not exist")
    if model.is_file():
        wanted = (".safetensors",) if model_type == "safetensors" else PICKLE_SUFFIXES
        if not model.name.endswith(wanted):
            raise InputError(f"{what} {model} is not a {model_type} file: pass the matching --{what.split()[0]}-type")
    return model


def _replace_existing_file(path: Path, inputs: list[Path]) -> OutputState:
    # The original scripts replaced an existing output file; folders are never replaced, inputs never.
    return check_output(path, overwrite=path.is_file(), inputs=inputs)


def _run(prog: str, body) -> int:
    """Run a script's body: one ``PROG: error: ...`` line and exit 1 on bad input, 130/143 when interrupted."""
    return run_guarded(
        body,
        lambda message: print(f"{prog}: error: {message}", file=sys.stderr),
        lambda verb: print(f"{prog}: {verb}; nothing was written to the output", file=sys.stderr),
    )


def _banner(title: str, lines: Sequence[str]) -> None:
    print("=" * 50)
    print(title)
    print("=" * 50)
    for line in lines:
        print(line)
    print("=" * 50)


def extractor_parser() -> argparse.ArgumentParser:
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


def extractor_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-extractor``."""
    args = extractor_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return _run("lora-extractor", lambda: _extract(args))


def _extract(args: argparse.Namespace) -> int:
    """``lora-extractor`` itself (run by extractor_main with the shared error endings)."""
    from .extract import extract
    from .extract_cli import print_statistics

    source = check_model_type(args.source_model, args.source_type, "source model")
    target = check_model_type(args.target_model, args.target_type, "target model")
    out = output_file(args.output, args.output_format)
    _banner(
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


def merger_parser() -> argparse.ArgumentParser:
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
    matcher = KeyMatcher(plan_keys)
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


def merger_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lora-merger``."""
    args = merger_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return _run("lora-merger", lambda: _merge(args))


def _merge(args: argparse.Namespace) -> int:
    """``lora-merger`` itself (run by merger_main with the shared error endings)."""
    source = check_model_type(args.source_model, args.source_type, "source model")
    lora = check_model_type(args.lora_model, args.lora_type, "lora model")
    out = output_file(args.output, args.output_format)
    _banner(
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
    """Merge ``lora`` into ``source`` with strength ``alpha`` and write one file (safetensors or ``.pt``).

    An existing output file is replaced (as the original script did); an output that is or lies inside an input
    is refused.
    """
    checked = _replace_existing_file(out, [source, lora])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LorafuseError("--device cuda was asked for but no CUDA device is available: use --device cpu")
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
        bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging", leave=False)
        try:
            with AtomicOutput(out, is_dir=False, checked=checked) as tmp:
                if out.suffix == ".safetensors":
                    write_safetensors(plan, tmp.tmp.parent, "model", 1 << 62, device, bar.update, single_file=tmp.tmp)
                else:  # torch.save needs the whole state dict in memory
                    state = {}
                    for tensor in plan.tensors:
                        state[tensor.name] = compute_tensor(plan, tensor, device).contiguous()
                        bar.update(tensor.nbytes)
                    save_torch_file(state, tmp.tmp)
                    del state
                tmp.commit()
        finally:
            bar.close()
        _print_merge_statistics(plan, kept, unmatched, mismatched)
        print(f"Merged model saved to: {out}")
        return plan
    finally:
        checkpoint.close()
        for targeted in adapter.edits if adapter is not None else []:
            for ref in targeted.edit.refs():
                ref.checkpoint.close()


def _print_merge_statistics(
    plan: MergePlan, kept: list[TargetedEdit], unmatched: list[str], mismatched: list[str]
) -> None:
    lora = sum(isinstance(t.edit, LoraDelta) for t in kept)
    diff = sum(isinstance(t.edit, FullDiff) for t in kept)
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
