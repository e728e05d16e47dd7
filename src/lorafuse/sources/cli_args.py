"""The source flags of ``lorafuse merge`` and how its positionals split into ``[BASE] ADAPTER...``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from .adapter_config import CONFIG_NAME

SOURCES_HELP = (
    "a folder or .safetensors file, hf://ORG/NAME[@REV], ms://ORG/NAME[@REV], a bare ORG/NAME (Hub) or a git URL"
)


def add_source_args(p: argparse.ArgumentParser) -> None:
    """Add ``--base``, ``--base-revision``, ``--adapter-ref/-subfolder/-config`` and ``--cache-dir``."""
    p.add_argument(
        "--base",
        dest="base_option",
        metavar="BASE",
        help="the base model; every positional is then an adapter (default: the first of two or more positionals, "
        "unless it is a local adapter folder; else the base named in the adapter's adapter_config.json)",
    )
    p.add_argument("--base-revision", help="branch, tag or commit of the base model (Hub, ModelScope or git)")
    p.add_argument(
        "--adapter-ref",
        action="append",
        help="git branch, tag or commit (or Hub revision) of the adapter; once for all adapters or once per adapter",
    )
    p.add_argument(
        "--adapter-subfolder", action="append", help="the adapter's folder inside its repo or checkpoint folder"
    )
    p.add_argument(
        "--adapter-config",
        action="append",
        metavar="FILE",
        help=f"{CONFIG_NAME} for adapters that have none (else $ADAPTER_CONFIG_JSON, then $ADAPTER_CONFIG_PATH)",
    )
    p.add_argument("--cache-dir", help="download cache for Hub/ModelScope sources (default: the hubs' own caches)")


def _is_local_adapter_folder(text: str) -> bool:
    path = Path(text).expanduser()
    return path.is_dir() and (path / CONFIG_NAME).is_file() and not (path / "config.json").is_file()


def split_base(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(base or None, adapters) from ``[BASE] ADAPTER...`` and ``--base``.

    ``--base X`` makes every positional an adapter. Otherwise one positional is an adapter (base from its
    config); with two or more the first is the base, unless it is a local folder holding adapter_config.json and
    no config.json (an adapter folder), in which case all are adapters.
    """
    positionals = ([args.base] if args.base is not None else []) + list(args.adapters)
    if args.base_option:
        return args.base_option, positionals
    if len(positionals) == 1 or _is_local_adapter_folder(positionals[0]):
        return None, positionals
    return positionals[0], positionals[1:]


def _one_or_list(values: list[str] | None) -> str | list[str] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def merge_source_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`lorafuse.merge` from the parsed source flags.

    With ``--verify`` clones and generated configs must outlive the merge: they go to a temporary folder kept with
    ``args`` (removed at exit).
    """
    kwargs: dict[str, Any] = {
        "adapter_ref": _one_or_list(args.adapter_ref),
        "adapter_subfolder": _one_or_list(args.adapter_subfolder),
        "adapter_config": _one_or_list(args.adapter_config),
        "cache_dir": args.cache_dir,
        "base_revision": args.base_revision,
    }
    if getattr(args, "verify", False):
        args.source_work = tempfile.TemporaryDirectory(prefix="lorafuse-work-")
        kwargs["work_dir"] = args.source_work.name
    return kwargs


def chosen_base_note(report: Any) -> str | None:
    """The line saying which base was taken from an adapter's config, when it was."""
    base = (report.sources or {}).get("base", {})
    if "chosen_from_adapter" not in base:
        return None
    revision = f" at revision {base['revision']}" if base.get("revision") else ""
    return (
        f"base model {base['source']}{revision}, from base_model_name_or_path in the adapter_config.json of "
        f"{base['chosen_from_adapter']}"
    )
