"""Which files of a model folder hold its weights (torch-free: the CLI uses it before ``import torch``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import InputError

WEIGHT_INDEX_RE = re.compile(r"^(?P<prefix>.+)\.(safetensors|bin)\.index\.json$")
SHARD_RE = re.compile(r"^(?P<prefix>.+?)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")
KNOWN_WEIGHT_PREFIXES = ("model", "pytorch_model", "diffusion_pytorch_model", "adapter_model")


def find_model_weights(folder: Path) -> tuple[list[Path], str, Path | None]:
    """Weight files of a model folder: (files in order, file-name prefix, index file or None).

    Prefers safetensors over .bin, an index over a glob; ignores adapter files and other folders.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist")
    for suffix in (".safetensors", ".bin"):
        indexes = sorted(folder.glob(f"*{suffix}.index.json"))
        if indexes:
            index = indexes[0]
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{index} is not a valid weight index (needs a 'weight_map'): {exc}") from exc
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise InputError(f"{index} lists {missing[0]}, which is missing from {folder}: download it again")
            prefix = WEIGHT_INDEX_RE.match(index.name).group("prefix")  # type: ignore[union-attr]
            return [folder / n for n in names], prefix, index
        for prefix in KNOWN_WEIGHT_PREFIXES:
            if prefix == "adapter_model":
                continue
            files = sorted(folder.glob(f"{prefix}{suffix}")) or sorted(folder.glob(f"{prefix}-*-of-*{suffix}"))
            if files:
                return files, prefix, None
        files = sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith("adapter_"))
        if suffix == ".safetensors" and files:
            match = SHARD_RE.match(files[0].name)
            return files, match.group("prefix") if match else "model", None
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
    raise InputError(f"{folder} holds no model weights (*.safetensors or pytorch_model*.bin); it holds: {listing}")
