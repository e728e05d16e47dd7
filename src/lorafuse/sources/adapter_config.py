"""``adapter_config.json`` for adapters that come without one, and the base model an adapter names.

A missing config is taken from ``--adapter-config FILE``, then ``ADAPTER_CONFIG_JSON`` (raw JSON), then
``ADAPTER_CONFIG_PATH`` (a file). The user's adapter folder is never written to: the config goes into a work
folder next to symlinks to the adapter's files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError, SourceError

CONFIG_NAME = "adapter_config.json"
ENV_JSON = "ADAPTER_CONFIG_JSON"
ENV_PATH = "ADAPTER_CONFIG_PATH"
PEFT_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where} is not valid JSON ({exc}): give a PEFT adapter_config.json") from exc
    if not isinstance(data, dict):
        raise InputError(f"{where} must hold a JSON object (a PEFT adapter_config.json)")
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
        return dict(config), "the adapter_config given"
    return _read_file(config, "--adapter-config"), str(config)


def env_config(environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], str] | None:
    """The config from ``ADAPTER_CONFIG_JSON`` or else ``ADAPTER_CONFIG_PATH``; None when neither is set."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_JSON, "").strip():
        return _parse(environ[ENV_JSON], f"environment variable {ENV_JSON}"), ENV_JSON
    if environ.get(ENV_PATH, "").strip():
        return _read_file(environ[ENV_PATH], f"{ENV_PATH}="), environ[ENV_PATH]
    return None


def folder_with_config(adapter: Path, config: dict[str, Any], dest: Path) -> Path:
    """A work folder ``dest`` holding ``config`` as adapter_config.json and symlinks to ``adapter``'s files."""
    if dest.exists():
        raise SourceError(f"work folder {dest} already exists: use an empty work folder")
    dest.mkdir(parents=True)
    for entry in sorted(Path(adapter).iterdir()):
        if entry.name != CONFIG_NAME and not entry.name.startswith("."):
            (dest / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
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
