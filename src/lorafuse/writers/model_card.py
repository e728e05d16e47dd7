"""The merged model's README.md (its model card): what it was made from, instead of the base's card.

The card says which base, which adapters (with their weights, formats and the sha256 of their files), the dtype
and the lorafuse version. The base card's YAML front matter (the Hub's metadata header) is kept for what still
holds for the merged model (license, language, pipeline_tag, library_name, datasets, gating ...), with
``base_model`` set to the base and ``lorafuse`` added to the tags; what describes the base itself (its own
``base_model``, ``base_model_relation``, ``model-index`` evaluation results, ``new_version``) is dropped. The
header is edited by its top-level keys only (no YAML parser is needed, and the base's values keep their exact
text).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..report import MergeReport

CARD_NAME = "README.md"
TAG = "lorafuse"
# Top-level keys of the base card that describe the base model, not the merged one.
DROPPED_KEYS = frozenset({"base_model", "base_model_relation", "model-index", "new_version", "tags"})
_KEY_LINE = re.compile(r"([A-Za-z0-9_][\w.-]*)\s*:(.*)")
_PLAIN = re.compile(r"[A-Za-z0-9][\w./-]*")
_HF_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")


def split_front_matter(text: str) -> tuple[list[tuple[str | None, list[str]]], str]:
    """A card's YAML front matter as (top-level key, its lines) blocks, and the rest of the card.

    Lines before the first key (comments) form a block with key None; a card without front matter gives no
    blocks and the whole text.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return [], text
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return [], text  # not closed: not front matter
    blocks: list[tuple[str | None, list[str]]] = []
    for line in lines[1:end]:
        match = _KEY_LINE.fullmatch(line)
        if match is not None and not line[0].isspace():
            blocks.append((match.group(1), [line]))
        elif blocks:
            blocks[-1][1].append(line)
        else:
            blocks.append((None, [line]))
    return blocks, "\n".join(lines[end + 1 :])


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _tags(block: list[str]) -> list[str]:
    """The tags of a ``tags:`` block, in flow (``[a, b]``), block (``- a``) or single-value form."""
    inline = _KEY_LINE.fullmatch(block[0]).group(2).split(" #")[0].strip()  # type: ignore[union-attr]
    if inline.startswith("[") and inline.endswith("]"):
        return [_scalar(t) for t in inline[1:-1].split(",") if t.strip()]
    if inline:
        return [_scalar(inline)]
    return [_scalar(line.strip()[1:]) for line in block[1:] if line.strip().startswith("- ")]


def _yaml_string(value: str) -> str:
    """``value`` as a YAML scalar: plain when it is a simple id, else double-quoted (JSON's quoting is YAML's)."""
    return value if _PLAIN.fullmatch(value) else json.dumps(value)


def hub_id(info: dict[str, Any], path: str) -> str | None:
    """The Hugging Face Hub id of a source (provenance ``info``, its local ``path``), None when it has none: a Hub
    download, or a local folder inside a Hub cache (``models--ORG--NAME/snapshots/REV``)."""
    if info.get("kind") == "hf":
        from ..sources.spec import parse_source

        return parse_source(info["source"], "hf").location
    match = _HF_CACHE.search(Path(path).absolute().as_posix() + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _shown(info: dict[str, Any], path: str) -> str:
    """How the card names a source: what the user gave for a download or clone, else the local path."""
    if info.get("kind") in ("hf", "ms", "git"):
        revision = info.get("commit") or info.get("revision")
        return info["source"] + (f" (revision {revision})" if revision and "@" not in info["source"] else "")
    return path


def front_matter(base_card: str | None, base_model: str | None) -> list[str]:
    """The merged card's front matter lines, from the base card's (``base_card``: its text, if any)."""
    blocks, _body = split_front_matter(base_card or "")
    tags: list[str] = []
    lines: list[str] = []
    for key, block in blocks:
        if key == "tags":
            tags = _tags(block)
        if key not in DROPPED_KEYS:
            lines += block
    if base_model is not None:
        lines.append(f"base_model: {_yaml_string(base_model)}")
    lines.append("tags:")
    lines += [f"- {_yaml_string(tag)}" for tag in dict.fromkeys([*tags, TAG])]
    return ["---", *lines, "---"]


def render_card(report: MergeReport, base_card: str | None) -> str:
    """The README.md of the merged model described by ``report`` (``base_card``: the base's README.md text).

    It holds no output path or time: the same inputs give the same card wherever the merge wrote.
    """
    base_info = (report.sources or {}).get("base", {})
    adapter_infos = (report.sources or {}).get("adapters", [])
    base_model = hub_id(base_info, report.base)
    header = front_matter(base_card, base_model)
    base_name = base_model or _shown(base_info, report.base)
    lines = [
        *header,
        "",
        f"# {Path(base_name).name} with {len(report.adapters)} merged LoRA adapter(s)",
        "",
        f"This model is **{base_name}** with {len(report.adapters)} LoRA adapter(s) merged into its weights by "
        f"[lorafuse](https://pypi.org/project/lorafuse/) {report.lorafuse_version}: a plain model that loads without "
        "PEFT and computes what the base with the adapters applied computes.",
        "",
        "| order | adapter | weight | format | file | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for i, adapter in enumerate(report.adapters, 1):
        info = adapter_infos[i - 1] if i - 1 < len(adapter_infos) else {}
        files = adapter["files"] or {"-": "-"}
        for name, digest in files.items():
            where = _shown(info, adapter["path"]).replace("|", "\\|")
            lines.append(f"| {i} | {where} | {adapter['weight']:g} | {adapter['format']} | {name} | `{digest}` |")
    lines += [
        "",
        f"- dtype: {report.dtype}" + (" (each tensor keeps the base's dtype)" if report.dtype == "auto" else ""),
        f"- tensors changed: {report.tensors_touched} of {report.tensors_total}",
        f"- weight files: {', '.join(report.files)}",
    ]
    if report.tokenizer_from:
        lines.append(f"- tokenizer: the one saved with the adapter {report.tokenizer_from}")
    if report.idle_adapters:
        lines.append(f"- adapters that change nothing (every lora_B is all zero): {', '.join(report.idle_adapters)}")
    lines += [
        "",
        f"The base model's own card (its description, intended use and limitations) is at {base_name}; what is "
        "said there about its behaviour may no longer hold after the merge.",
        "",
        "`lorafuse_merge.json` in this folder records the merge in full; `lorafuse verify .` recomputes every merged "
        "tensor from it and checks it.",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, report: MergeReport) -> None:
    """Write the merged model's README.md into ``folder``, over the base's copy there (whose front matter it keeps)."""
    path = folder / CARD_NAME
    try:
        base_card = path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        base_card = None  # an unreadable card has no metadata to keep
    path.write_text(render_card(report, base_card), encoding="utf-8")
