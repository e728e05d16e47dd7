"""Carry over every non-weight file of a model folder (config, tokenizer, chat template, custom code, sub-folders).

What is copied is always a regular file's content, never a link: a link inside the model folder is copied as the
file it points to; a link out of it, a broken link and a symlink loop are refused before anything is copied
(model_files.py has the rule, including Hugging Face cache snapshots). Weight files other than the merged ones
(a pytorch_model.bin beside model.safetensors, ``original/consolidated.safetensors``) are left out, with a warning
naming them: they hold the unmerged model under names loaders pick up.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .model_files import link_roots, real_path, shown

log = logging.getLogger("lorafuse")

# Other copies of the weights beside the ones merged (a pytorch_model.bin next to model.safetensors, Mistral's
# consolidated.safetensors, TF/Flax/GGUF/ONNX exports) hold the *unmerged* model under names loaders pick up.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


@dataclass
class _Carry:
    """What copy_extra_files will copy, all checked before the first byte is written."""

    files: list[tuple[Path, Path]] = field(default_factory=list)  # (real source file, path relative to the output)
    weights: list[str] = field(default_factory=list)  # unmerged weight files left out, relative to the base


def _regular(real: Path, path: Path) -> Path:
    if not real.is_file():
        raise InputError(f"{shown(path)} is not a regular file or folder: remove it from the model folder")
    return real


def _collect(
    folder: Path, rel: Path, base: Path, roots: tuple[Path, ...], above: set[Path], carry: _Carry, skip: set[str]
) -> None:
    """Add what ``folder`` (``base`` itself, or a sub-folder of it at ``rel``) contributes to the output.

    ``above``: the real paths of ``folder`` and the folders holding it (a link back to one is a loop);
    ``skip``: paths (as strings) left out without a word, the merged weights and what the output already holds.
    """
    for entry in sorted(folder.iterdir()):
        name = rel / entry.name
        if entry.name.startswith(".") or entry.name.endswith(WEIGHT_INDEX_SUFFIXES):
            continue
        if str(name) in skip or os.path.realpath(entry) in skip:
            continue
        if entry.name.endswith(WEIGHT_FILE_SUFFIXES) and not entry.is_dir():
            carry.weights.append(str(name))
            continue
        real = real_path(entry, base, roots)
        if not real.is_dir():
            carry.files.append((_regular(real, entry), name))
        elif real in above:
            raise InputError(
                f"{shown(entry)} links back to {shown(real)}, a folder that holds it (a symlink loop): remove it"
            )
        else:
            _collect(entry, name, base, roots, above | {real}, carry, skip)


def _carry(base_folder: Path, weight_files: list[Path], skip_names: set[str]) -> _Carry:
    skip = {*skip_names, *(os.path.realpath(p) for p in weight_files)}
    carry, above = _Carry(), {Path(os.path.realpath(base_folder))}
    _collect(base_folder, Path(), base_folder, link_roots(base_folder), above, carry, skip)
    return carry


def extra_file_names(base_folder: Path, weight_files: list[Path], skip_names: set[str]) -> list[str]:
    """The top-level names :func:`copy_extra_files` would copy from ``base_folder`` (links checked the same way),
    for a dry run; ``skip_names``: what the output itself holds."""
    carry = _carry(Path(base_folder), weight_files, skip_names)
    return list(dict.fromkeys(rel.parts[0] for _, rel in carry.files))


def copy_extra_files(
    base_folder: Path,
    dest: Path,
    weight_files: list[Path],
    skip_names: set[str],
    warnings: list[str] | None = None,
) -> list[str]:
    """Copy everything in ``base_folder`` except weight files, their indexes, hidden entries and what ``dest``
    already holds (the merged weights are never replaced by a base file of the same name); returns the top-level
    names copied.

    Links are checked first (InputError for one out of the folder, broken or looping; nothing is copied then).
    Weight files not among ``weight_files``, at the top or in sub-folders, are left out with a warning, logged and
    appended to ``warnings`` when given (the merge report's).
    """
    base_folder, dest = Path(base_folder), Path(dest)
    # The output's own weights and index are never replaced by the base's files of the same names.
    carry = _carry(base_folder, weight_files, {*skip_names, *(p.name for p in dest.iterdir())})
    for real, rel in carry.files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)  # only folders that get a file
        shutil.copy2(real, dest / rel)  # a real path: copies the content, never a link
    if carry.weights:
        names = ", ".join(shown(n) for n in carry.weights[:10])
        more = f" and {len(carry.weights) - 10} more" if len(carry.weights) > 10 else ""
        message = (
            f"not copied into the output: {names}{more} (weight files the merge did not use; loaders could pick up "
            "these unmerged weights)"
        )
        log.warning(message)
        if warnings is not None:
            warnings.append(message)
    return list(dict.fromkeys(rel.parts[0] for _, rel in carry.files))


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


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass
class TokenizerFiles:
    """The tokenizer files of one folder, each checked to be a regular file inside it (``files``: name -> the
    real file to read)."""

    folder: Path
    files: dict[str, Path]

    def replaces(self) -> tuple[str, ...]:
        """The output's tokenizer files these replace: a whole tokenizer (its config and vocabulary) replaces every
        one (a stale base file such as tokenizer.model would otherwise be read by some loaders), a chat template
        the base's chat templates; each file replaces its namesake in any case."""
        if "tokenizer_config.json" in self.files and any(name in self.files for name in VOCABULARY_FILES):
            return TOKENIZER_FILES
        if any(name in self.files for name in CHAT_TEMPLATE_FILES):
            return tuple(dict.fromkeys([*CHAT_TEMPLATE_FILES, *self.files]))
        return tuple(self.files)

    def differs_from(self, other: TokenizerFiles | None) -> bool:
        """True when one of these files is not in ``other`` with the same bytes (installing them changes it)."""
        if other is None:
            return True
        return any(
            name not in other.files or not filecmp.cmp(path, other.files[name], shallow=False)
            for name, path in self.files.items()
        )

    def same_as(self, other: TokenizerFiles) -> bool:
        """True when both hold the same files with the same bytes."""
        return set(self.files) == set(other.files) and not self.differs_from(other)


def find_tokenizer(folder: Path) -> TokenizerFiles | None:
    """The tokenizer files in ``folder`` (None when it holds none).

    A tokenizer file that is a broken link, a symlink loop or a link out of ``folder`` is an InputError (a model
    must not get a tokenizer from elsewhere, nor lose one silently); all are checked here, before any copy.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    roots = link_roots(folder)
    names = [name for name in TOKENIZER_FILES if os.path.lexists(folder / name)]
    if not names:
        return None
    return TokenizerFiles(
        folder, {name: _regular(real_path(folder / name, folder, roots), folder / name) for name in names}
    )


def install_tokenizer(tokenizer: TokenizerFiles, dest: Path) -> list[str]:
    """Put ``tokenizer`` into the model folder ``dest`` in place of the tokenizer files it replaces; returns the
    names written."""
    for name in tokenizer.replaces():
        if name not in tokenizer.files:
            (Path(dest) / name).unlink(missing_ok=True)
    for name, real in tokenizer.files.items():
        shutil.copy2(real, Path(dest) / name)  # the real file: content, never a link
    return list(tokenizer.files)


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files of folder ``source`` into ``dest`` (:func:`find_tokenizer`, then
    :func:`install_tokenizer`); returns their names."""
    tokenizer = find_tokenizer(source)
    return install_tokenizer(tokenizer, dest) if tokenizer is not None else []


def update_config(config_path: Path, updates: dict[str, Any]) -> None:
    """Apply ``updates`` to config.json at the top level and in nested model configs that carry the same key.

    A value of None removes the key (e.g. ``quantization_config`` after dequantizing).
    """
    if not updates or not config_path.is_file():
        return
    config = read_json(config_path)
    if config is None:
        raise InputError("the base model's config.json is not a JSON object: fix it (the merge updates it)")
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
    """The JSON object in ``path``; None when it is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        return None
    return data if isinstance(data, dict) else None
