"""``lorafuse convert ADAPTER --to gguf -o OUT.gguf``: an adapter in another program's format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="a PEFT LoRA adapter folder")
    p.add_argument("--to", required=True, choices=["gguf"], help="the format written: gguf (a llama.cpp LoRA)")
    p.add_argument("-o", "--output", required=True, help="the file written (.gguf)")
    p.add_argument(
        "--base",
        default=None,
        help="the base model's folder (its config.json; no weights are read); default: the local folder the "
        "adapter's base_model_name_or_path names",
    )
    p.add_argument("--outtype", default="f32", help="f32 (default, as llama.cpp's converter), f16, bf16 or q8_0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Convert a PEFT LoRA adapter to another program's format (a GGUF LoRA for llama.cpp)."""
    from ..errors import LorafuseError
    from ..gguf_lora import convert_lora
    from ..peft_flags import load_config

    base = args.base
    if base is None:
        named = load_config(Path(args.adapter) / "adapter_config.json").base_model_name_or_path
        if not named or not Path(named).is_dir():
            raise LorafuseError(
                f"{args.adapter} names no local base folder ({named or 'no base_model_name_or_path'}): give --base"
            )
        base = named
    result = convert_lora(args.adapter, base, args.output, args.outtype, args.overwrite)
    if args.json:
        print(json.dumps(vars(result), indent=2))
    else:
        print(f"wrote {result.output}: {result.tensors} tensors, {result.architecture} LoRA, alpha {result.alpha:g}, "
              f"{result.outtype}")  # fmt: skip
    return 0
