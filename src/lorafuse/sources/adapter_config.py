"""``adapter_config.json`` for adapters that come without one, and the base model an adapter names.

A missing config is taken from ``--adapter-config FILE``, then ``ADAPTER_CONFIG_JSON`` (raw JSON), then
``ADAPTER_CONFIG_PATH`` (a file). The user's adapter folder is never written to: the config goes into a work
folder next to symlinks to the adapter's files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError, SourceError
from ..io.extra_files import TOKENIZER_FILES
from ..io.model_files import is_inside
from ..peft_flags import config_object, parse_config

CONFIG_NAME = "adapter_config.json"
ENV_JSON = "ADAPTER_CONFIG_JSON"
ENV_PATH = "ADAPTER_CONFIG_PATH"
PEFT_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def _parse(text: str, where: str) -> dict[str, Any]:
    return config_object(text, where)


def _checked(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` once the merge's own reader accepts it: a bad value is named with where it came from, before any
    work folder is made."""
    parse_config(data, where)
    return data


def _read_file(path: str | Path, where: str) -> dict[str, Any]:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise InputError(f"{where} {path} cannot be read ({exc.strerror or exc}): check the path") from exc
    return _parse(text, f"{where} {path}")


def explicit_config(config: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(config, where it came from) for a config given as a file path or a mapping."""
    if isinstance(config, Mapping):
        where = "the adapter_config given"
        try:  # written to the work folder as JSON, and read back from there
            text = json.dumps(dict(config))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InputError(f"{where} cannot be written as JSON ({exc}): pass plain JSON values") from None
        return _checked(_parse(text, where), where), where
    return _checked(_read_file(config, "--adapter-config"), f"--adapter-config {config}"), str(config)


def env_config(environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], str] | None:
    """The config from ``ADAPTER_CONFIG_JSON`` or else ``ADAPTER_CONFIG_PATH``; None when neither is set."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_JSON, "").strip():
        where = f"environment variable {ENV_JSON}"
        return _checked(_parse(environ[ENV_JSON], where), where), ENV_JSON
    if environ.get(ENV_PATH, "").strip():
        path = environ[ENV_PATH]
        return _checked(_read_file(path, f"{ENV_PATH}="), f"{ENV_PATH}={path}"), path
    return None


def folder_with_config(adapter: Path, config: dict[str, Any], dest: Path) -> Path:
    """A work folder ``dest`` holding ``config`` as adapter_config.json and symlinks to ``adapter``'s files."""
    if dest.exists():
        raise SourceError(f"work folder {dest} already exists: use an empty work folder")
    dest.mkdir(parents=True)
    for entry in sorted(Path(adapter).iterdir()):
        if entry.name == CONFIG_NAME or entry.name.startswith("."):
            continue
        if entry.name in TOKENIZER_FILES and is_inside(entry, adapter):
            shutil.copy2(entry, dest / entry.name)  # a copy: the merge copies no tokenizer through a link out
        else:  # realpath: a symlink loop stays a loop for the reader to name (Path.resolve raises here)
            (dest / entry.name).symlink_to(os.path.realpath(entry), target_is_directory=entry.is_dir())
    (dest / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return dest


def looks_like_peft_without_config(folder: Path) -> bool:
    """A folder with PEFT weight files but no adapter_config.json."""
    return (
        folder.is_dir()
        and not (folder / CONFIG_NAME).is_file()
        and any((folder / name).is_file() for name in PEFT_WEIGHT_NAMES)
    )


def base_named_by(adapter: Path) -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) from the adapter's adapter_config.json."""
    path = Path(adapter) / CONFIG_NAME
    if not path.is_file():
        raise SourceError(f"no BASE given and adapter {adapter} has no {CONFIG_NAME} to name one: pass the base model")
    data = _read_file(path, "adapter config")
    base = data.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise SourceError(f"no BASE given and {path} has no base_model_name_or_path: pass the base model")
    revision = data.get("revision")
    return base.strip(), revision if isinstance(revision, str) and revision.strip() else None
