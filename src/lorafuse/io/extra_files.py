"""Carry over every non-weight file of a model folder (config, tokenizer, chat template, custom code, sub-folders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Other copies of the weights beside the ones merged (a pytorch_model.bin next to model.safetensors, Mistral's
# consolidated.safetensors, TF/Flax/GGUF/ONNX exports) hold the *unmerged* model under names loaders pick up.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def copy_extra_files(base_folder: Path, dest: Path, weight_files: list[Path], skip_names: set[str]) -> list[str]:
    """Copy everything in ``base_folder`` except weight files, their indexes, hidden entries and what ``dest``
    already holds (the merged weights are never replaced by a base file of the same name)."""
    skip = {p.resolve() for p in weight_files}
    copied: list[str] = []
    for entry in sorted(base_folder.iterdir()):
        if entry.name.startswith(".") or entry.name in skip_names or entry.resolve() in skip:
            continue
        if entry.name.endswith((".safetensors.index.json", ".bin.index.json")):
            continue
        if entry.is_file() and entry.name.endswith(WEIGHT_FILE_SUFFIXES):
            continue
        target = dest / entry.name
        if target.exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copy2(entry, target)
        copied.append(entry.name)
    return copied


# What a tokenizer consists of (transformers' fast and slow tokenizers, sentencepiece, chat templates).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files of folder ``source`` into ``dest``, replacing those there; returns their names."""
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in names:
        shutil.copy2(source / name, dest / name)
    return names


def update_config(config_path: Path, updates: dict[str, Any]) -> None:
    """Apply ``updates`` to config.json at the top level and in nested model configs that carry the same key.

    A value of None removes the key (e.g. ``quantization_config`` after dequantizing).
    """
    if not updates or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    for key, value in updates.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
        for sub in config.values():
            if isinstance(sub, dict) and key in sub:
                if value is None:
                    sub.pop(key)
                else:
                    sub[key] = value
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
