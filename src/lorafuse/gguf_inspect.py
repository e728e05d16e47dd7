"""``lorafuse inspect model.gguf``: what a GGUF file holds (architecture, kind, tensor types and sizes, the
lorafuse provenance of a merge), read from its header with gguf-py (no tensor data is read)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .names.gguf import require_gguf
from .writers.gguf import PROVENANCE_KEY

SHOWN_KEYS = ("general.name", "general.type", "general.file_type", "general.size_label", "adapter.type",
              "adapter.lora.alpha", "tokenizer.ggml.model", "tokenizer.ggml.pre")  # fmt: skip
ARCH_KEYS = ("block_count", "context_length", "embedding_length", "attention.head_count", "attention.head_count_kv")


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """A GGUF file's report: ``kind`` "gguf", its architecture, key metadata, tensor types (count, bytes) and
    parameter count; ``provenance``: what lorafuse merged into it, when it did."""
    gguf = require_gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 -- gguf-py raises many kinds on a damaged file
        raise InputError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        contents = field.contents()
        return contents if not isinstance(contents, list) or len(contents) <= 8 else f"[{len(contents)} values]"

    arch = value("general.architecture")
    keys = {k: value(k) for k in SHOWN_KEYS if k in reader.fields}
    keys.update({f"{arch}.{k}": value(f"{arch}.{k}") for k in ARCH_KEYS if f"{arch}.{k}" in reader.fields})
    if isinstance(keys.get("general.file_type"), int):
        keys["general.file_type"] = gguf.LlamaFileType(keys["general.file_type"]).name
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    params = 0
    for t in reader.tensors:
        counts[t.tensor_type.name] += 1
        sizes[t.tensor_type.name] += int(t.n_bytes)
        params += int(np.prod(t.shape.tolist(), dtype=np.int64))
    provenance = value(PROVENANCE_KEY)
    return {
        "kind": "gguf",
        "path": str(path),
        "architecture": arch,
        "file_bytes": path.stat().st_size,
        "tensors": len(reader.tensors),
        "parameters": params,
        "types": {name: {"tensors": counts[name], "bytes": sizes[name]} for name in sorted(counts)},
        "metadata": keys,
        "keys": len([k for k in reader.fields if not k.startswith("GGUF.")]),
        "provenance": json.loads(provenance) if isinstance(provenance, str) else None,
    }


def render_gguf(report: dict[str, Any]) -> str:
    """The readable summary of :func:`inspect_gguf`'s report."""
    lines = [
        f"GGUF {report['path']}: {report['architecture']}, {report['tensors']} tensors, "
        f"{report['parameters']:,} parameters, {report['file_bytes']:,} bytes, {report['keys']} keys"
    ]
    lines += [f"  {key} = {val}" for key, val in report["metadata"].items()]
    lines.append("  tensor types:")
    lines += [f"    {name:<8} {t['tensors']:>5} tensors {t['bytes']:>15,} bytes" for name, t in report["types"].items()]
    if report["provenance"]:
        adapters = report["provenance"].get("adapters", [])
        lines.append(
            f"  merged by lorafuse {report['provenance'].get('lorafuse_version', '?')}: {len(adapters)} adapter(s)"
        )
        for adapter in adapters:
            files = ", ".join(f"{name} sha256 {digest[:12]}" for name, digest in adapter.get("files", {}).items())
            lines.append(f"    {adapter.get('format')} weight {adapter.get('weight')}: {files}")
    return "\n".join(lines)
