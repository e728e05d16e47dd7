"""What ``lora-extractor`` and ``lora-merger`` share: the original scripts' choices, output naming, input type
checks, banner and error endings."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ...errors import InputError
from ...io.checkpoint import PICKLE_SUFFIXES
from ..exits import run_guarded

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


def run_script(prog: str, body: Callable[[], int]) -> int:
    """Run a script's body: one ``PROG: error: ...`` line and exit 1 on bad input, 130/143 when interrupted."""
    return run_guarded(
        body,
        lambda message: print(f"{prog}: error: {message}", file=sys.stderr),
        lambda verb: print(f"{prog}: {verb}; nothing was written to the output", file=sys.stderr),
    )


def banner(title: str, lines: Sequence[str]) -> None:
    """The original scripts' start banner."""
    print("=" * 50)
    print(title)
    print("=" * 50)
    for line in lines:
        print(line)
    print("=" * 50)
