"""``lorafuse inspect``: what an adapter or a model folder holds, read from headers and small tensors only.

For an adapter (any format :func:`lorafuse.formats.read_adapter` reads): format, PEFT tuner type, target modules,
parameter count, the base model it names, and per module what its edit describes itself as (kind and its own size
fields, :meth:`lorafuse.edits.Edit.describe`) and the Frobenius norm of its update where the base does not set it
(LoRA's ``||scale * B @ A||_F`` from the two r x r Gram matrices instead of the full product:
:meth:`lorafuse.edits.Edit.delta_norm`); LoRA's own fields (alphas, scalings, rsLoRA/DoRA) for LoRA only. For a
model: architecture, dtypes, parameter count, shards, tied embeddings and quantization. numpy only: no torch unless
a pickled adapter needs it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import short_name as dtype_short_name
from .edits import Edit, TensorRef
from .errors import InputError, LorafuseError
from .io.checkpoint import Checkpoint, open_model
from .io.extra_files import read_json
from .quantized import detect_quantization
from .report import format_bytes
from .report import text_table as _table
from .serving import VLLM_DEFAULT_MAX_LORA_RANK, check_max_lora_rank, check_vllm_path, render_verdict

ADAPTER_CONFIG = "adapter_config.json"
PEFT_EXTRAS = (
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "target_modules",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "lora_bias",
    "layers_to_transform",
    "init_lora_weights",
)
# Where non-PEFT formats name their base model (kohya / diffusers / modelspec safetensors metadata).
BASE_METADATA_KEYS = (
    "base_model_name_or_path",
    "base_model",
    "ss_sd_model_name",
    "ss_base_model_version",
    "modelspec.architecture",
)
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight")


# The edit kinds of a LoRA adapter: their scale is PEFT's lora_alpha / r (rsLoRA: / sqrt(r)).
LORA_KINDS = ("lora", "dora", "kasa")
# Fields of a module row that are not the sizes its edit reports.
ROW_FIELDS = ("target", "kind", "source_key", "norm", "zero_effect", "alpha", "optional")


def _edit_row(target: str, edit: Edit, rslora: bool) -> dict[str, Any]:
    """One module's row: what the edit describes itself as (kind and its own size fields: rank, scale, block
    size ...), LoRA's alpha, ``||update||_F`` (None when the change depends on the base) and whether it changes
    nothing."""
    loaded: dict[str, np.ndarray] = {}

    def load(ref: TensorRef) -> np.ndarray:  # norm and zero check read the same factors: once
        if ref.name not in loaded:
            loaded[ref.name] = ref.load()
        return loaded[ref.name]

    row: dict[str, Any] = {"target": target, **edit.describe(), "source_key": edit.source_key}
    if row["kind"] in LORA_KINDS and "rank" in row and "scale" in row:
        row["alpha"] = row["scale"] * (math.sqrt(row["rank"]) if rslora else row["rank"])
    row["norm"] = edit.delta_norm(load)
    row["zero_effect"] = edit.no_effect(load)
    return row


def _sizes(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every scalar size field the modules' edits report (rank, scale, block_size ...), with its distinct values."""
    sizes: dict[str, set[Any]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ROW_FIELDS and isinstance(value, (bool, int, float, str)):
                sizes.setdefault(key, set()).add(round(value, 6) if isinstance(value, float) else value)
    return {key: sorted(values, key=str) for key, values in sizes.items()}


def _checkpoints(edits: list[Any]) -> list[Checkpoint]:
    seen: dict[int, Checkpoint] = {}
    for targeted in edits:
        for ref in targeted.edit.refs():
            seen.setdefault(id(ref.checkpoint), ref.checkpoint)
    return list(seen.values())


def _distinct(values: list[float]) -> list[float]:
    return sorted({round(v, 6) for v in values})


def _own_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Stand-in base shapes from a single-file adapter's own LoRA pairs, so names resolve to themselves.

    kohya names are resolved against a base model; without one, each module is its own target.
    """
    from .formats.single import adapter_file

    shapes: dict[str, tuple[int, ...]] = {}
    with Checkpoint([adapter_file(path)]) as checkpoint:
        infos = checkpoint.infos
        for key, info in infos.items():
            for down, up in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
                if key.endswith(down) and key[: -len(down)] + up in infos:
                    module = key[: -len(down)]
                    shapes[module + ".weight"] = (infos[module + up].shape[0], *info.shape[1:])
            if key.endswith((".diff", ".diff_b")):
                shapes[key.rsplit(".", 1)[0] + (".weight" if key.endswith(".diff") else ".bias")] = info.shape
    return shapes


def _base_shapes(base: str | Path | None) -> dict[str, tuple[int, ...]] | None:
    if base is None:
        return None
    checkpoint, _, _ = open_model(Path(base))
    with checkpoint:
        return {name: info.shape for name, info in checkpoint.infos.items()}


def inspect_adapter(
    path: str | Path,
    fmt: str | None = None,
    base: str | Path | None = None,
    serving: str | None = None,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
) -> dict[str, Any]:
    """A report on the adapter at ``path`` (see the module docstring); JSON-serialisable.

    ``base`` (a model folder or file) resolves names for formats that need the base model (kohya); without it
    such modules are listed under their own names. ``serving="vllm"`` adds ``serving``: whether vLLM serves the
    adapter as it is (:func:`lorafuse.serving.check_vllm_path`; the model's rules read from ``base``'s config.json,
    or from the folder the adapter names as its base).
    """
    if serving is not None and serving != "vllm":
        raise LorafuseError(f"--serving {serving!r}: lorafuse knows the rules of vllm only")
    if serving is not None:
        check_max_lora_rank(max_lora_rank)
    from .formats import detect_format, read_adapter
    from .formats.describe import describe_diffusion

    path = Path(path)
    fmt = fmt or detect_format(path)
    shapes = _base_shapes(base)
    if shapes is None and fmt not in ("peft",):
        shapes = _own_shapes(path)
    adapter = read_adapter(path, label=str(path), fmt=fmt, base_shapes=shapes)
    peft_config = read_json(path / ADAPTER_CONFIG) if path.is_dir() else None
    extras = {k: peft_config[k] for k in PEFT_EXTRAS if k in peft_config} if peft_config else {}
    rslora = bool(extras.get("use_rslora", False))
    checkpoints = _checkpoints(adapter.edits)
    try:
        rows = [{**_edit_row(t.target, t.edit, rslora), "optional": t.optional} for t in adapter.edits]
        diffusion = describe_diffusion(adapter)  # layout, algorithms, parts of a diffusion LoRA (else None)
        parameters = sum(info.numel for ckpt in checkpoints for info in ckpt.infos.values())
        metadata: dict[str, str] = {}
        for ckpt in checkpoints:
            metadata.update(ckpt.metadata)
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    base_model = (peft_config or {}).get("base_model_name_or_path") or next(
        (metadata[k] for k in BASE_METADATA_KEYS if metadata.get(k)), None
    )
    tuner = str((peft_config or {}).get("peft_type") or "LORA").upper() if adapter.fmt == "peft" else None
    lora_rows = [r for r in rows if r["kind"] in LORA_KINDS]
    # LoRA's own fields (alpha, scaling, rsLoRA, DoRA) for a LoRA adapter only: another tuner has none of them
    lora = tuner == "LORA" or (tuner is None and bool(lora_rows))
    kinds = Counter(r["kind"] for r in rows)
    verdict = None
    if serving is not None:
        verdict = check_vllm_path(path, _base_config(base, base_model), max_lora_rank).to_dict()
    return {
        "kind": "adapter",
        "path": str(path),
        "format": adapter.fmt,
        "tuner": tuner,
        "files": [str(f) for f in adapter.files],
        "base_model": base_model,
        "ranks": sorted({r["rank"] for r in rows if isinstance(r.get("rank"), int)}),
        "alphas": _distinct([r["alpha"] for r in lora_rows if "alpha" in r]) if lora else None,
        "scalings": _distinct([r["scale"] for r in lora_rows if "scale" in r]) if lora else None,
        "use_rslora": rslora if lora else None,
        "use_dora": bool(extras.get("use_dora", kinds.get("dora", 0) > 0)) if lora else None,
        "sizes": _sizes(rows),
        "target_modules": extras.get("target_modules", adapter.target_modules),
        "modules_targeted": len({r["target"] for r in rows}),
        "edit_kinds": dict(kinds),
        "parameters": parameters,
        "config": extras,
        "modules": rows,
        "zero_effect": [r["target"] for r in rows if r["zero_effect"]],
        "serving": verdict,
        "diffusion": diffusion,
    }


def _base_config(base: str | Path | None, named: str | None) -> dict[str, Any] | None:
    """The base model's config.json: from ``base``, else from the local folder the adapter names, else None."""
    for folder in (base, named):
        if folder is not None and Path(folder).is_dir():
            config = read_json(Path(folder) / "config.json")
            if config is not None:
                return config
    return None


def _weight_folder(path: Path) -> bool:
    try:
        open_model(path)[0].close()
        return True
    except LorafuseError:
        return False


def inspect_model(path: str | Path) -> dict[str, Any]:
    """A report on the model folder or weight file at ``path``; JSON-serialisable."""
    path = Path(path)
    if path.is_dir() and not _weight_folder(path):
        components = {p.name: inspect_model(p) for p in sorted(path.iterdir()) if p.is_dir() and _weight_folder(p)}
        if components:  # a diffusers pipeline: one model per sub-folder
            return {"kind": "pipeline", "path": str(path), "components": components}
    checkpoint, _prefix, index = open_model(path)
    try:
        infos = checkpoint.infos
        config = read_json(path / "config.json") if path.is_dir() else None
        dtypes: dict[str, dict[str, int]] = {}
        for info in infos.values():
            entry = dtypes.setdefault(dtype_short_name(info.dtype), {"tensors": 0, "parameters": 0})
            entry["tensors"] += 1
            entry["parameters"] += info.numel
        shards = []
        for file in checkpoint.files:
            shards.append(
                {
                    "file": file.name,
                    "bytes": file.stat().st_size,
                    "tensors": sum(1 for i in infos.values() if i.path == file),
                }
            )
        quant = detect_quantization(config, list(infos))
        tie_config = None
        if config is not None:
            tie_config = bool(config.get("tie_word_embeddings", True))
        has_embedding = any(k.endswith(EMBEDDING_SUFFIXES) for k in infos)
        lm_head = "lm_head.weight" in infos
        return {
            "kind": "model",
            "path": str(path),
            "architectures": (config or {}).get("architectures"),
            "model_type": (config or {}).get("model_type"),
            "config_dtype": (config or {}).get("dtype", (config or {}).get("torch_dtype")),
            "dtypes": dtypes,
            "parameters": sum(i.numel for i in infos.values()),
            "tensors": len(infos),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
            "index": index.name if index else None,
            # Tied: config says so (transformers' default is tied) and no separate head is stored.
            "tied_embeddings": bool(tie_config) and has_embedding and not lm_head if config is not None else None,
            "lm_head_stored": lm_head,
            "quantization": quant.to_dict() if quant else None,
            "merged_from": _provenance(path),
        }
    finally:
        checkpoint.close()


def _provenance(path: Path) -> dict[str, Any] | None:
    """Base and adapters of a model lorafuse merged (from its lorafuse_merge.json), else None."""
    data = read_json(path / "lorafuse_merge.json") if path.is_dir() else None
    if not data:
        return None
    adapters = [{"path": a.get("path"), "weight": a.get("weight")} for a in data.get("adapters", [])]
    return {"base": data.get("base"), "adapters": adapters, "lorafuse_version": data.get("lorafuse_version")}


def is_adapter(path: Path) -> bool:
    """True when ``path`` looks like an adapter rather than a model."""
    from .formats import detect_format

    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return True
    if path.is_dir() and ((path / "config.json").is_file() or (path / "model_index.json").is_file()):
        return False
    try:
        detect_format(path)
    except LorafuseError:
        return False
    return True


def inspect_path(
    path: str | Path,
    fmt: str | None = None,
    base: str | Path | None = None,
    serving: str | None = None,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
) -> dict[str, Any]:
    """Inspect an adapter (when ``fmt`` is given or the path looks like one) or a model; ``serving`` (adapters
    only): the serving engine to check the adapter against (``vllm``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: pass an adapter or a model folder")
    if path.suffix == ".gguf" and path.is_file() and fmt is None:  # llama.cpp's format: gguf_inspect.py
        from .gguf_inspect import inspect_gguf

        return inspect_gguf(path)
    if fmt is not None or is_adapter(path):
        return inspect_adapter(path, fmt, base, serving, max_lora_rank)
    if serving is not None:
        raise InputError(f"{path} is a model, not an adapter: --serving checks an adapter against the engine's rules")
    return inspect_model(path)


# ---- text rendering -------------------------------------------------------------------------------------------


def _fmt_num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.4g}"


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.2f}{suffix}{unit}"
        n /= 1000
    return f"{n}{unit}"


def _size_text(row: dict[str, Any]) -> str:
    """A module's size fields as its edit reports them: ``rank=4 scale=2 shape=32x48``."""
    parts = []
    for key, value in row.items():
        if key in ROW_FIELDS or value is None:
            continue
        if isinstance(value, float):
            value = _fmt_num(value)
        elif isinstance(value, list) and key == "shape":
            value = "x".join(map(str, value))
        elif isinstance(value, list) and key == "tokens" and len(value) > 4:
            value = ",".join(map(str, value[:4])) + f",... ({len(value)})"
        elif isinstance(value, list):
            value = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={value}")
    return " ".join(parts)


def render_adapter(report: dict[str, Any]) -> str:
    from .formats.describe import render_diffusion

    lines = [
        f"adapter      {report['path']}",
        f"format       {report['format']}",
        f"tuner        {report.get('tuner') or '-'}",
        f"base model   {report['base_model'] or '(not named)'}",
    ]
    if report["use_rslora"] is not None:  # a LoRA adapter
        lines += [
            f"rank         {', '.join(map(str, report['ranks'])) or '-'}",
            f"alpha        {', '.join(_fmt_num(a) for a in report['alphas']) or '-'}",
            f"scaling      {', '.join(_fmt_num(s) for s in report['scalings']) or '-'}",
            f"rslora/dora  {report['use_rslora']}/{report['use_dora']}",
        ]
    else:
        sizes = "; ".join(
            f"{key} {', '.join(_fmt_num(v) if isinstance(v, float) else str(v) for v in values)}"
            for key, values in report["sizes"].items()
        )
        lines.append(f"sizes        {sizes or '-'}")
    lines += [
        f"targets      {json.dumps(report['target_modules'])}",
        f"parameters   {_human(report['parameters'])} ({report['parameters']})",
        f"edits        {', '.join(f'{k}: {v}' for k, v in report['edit_kinds'].items())}",
        *([f"diffusion    {render_diffusion(report['diffusion'])}"] if report.get("diffusion") else []),
        "",
    ]
    rows = [
        [
            r["target"],
            r["kind"],
            _size_text(r),
            "depends on the base" if r["norm"] is None else _fmt_num(r["norm"]),
            "zero effect" if r["zero_effect"] else ("where the base has it" if r.get("optional") else ""),
        ]
        for r in report["modules"]
    ]
    lines += _table(rows, ["target", "kind", "size", "||dW||_F", ""])
    if report["zero_effect"]:
        lines += [
            "",
            f"{len(report['zero_effect'])} module(s) change nothing (their trained tensors leave the weight as it "
            "is: a zero lora_B or difference, an untrained tuner)",
        ]
    if report.get("serving"):
        lines += ["", *render_verdict(report["serving"])]
    return "\n".join(lines)


def render_model(report: dict[str, Any]) -> str:
    if report["kind"] == "pipeline":
        parts = [f"pipeline     {report['path']}"]
        for name, comp in report["components"].items():
            parts += ["", f"[{name}]", render_model(comp)]
        return "\n".join(parts)
    dtypes = ", ".join(f"{k} ({v['tensors']} tensors)" for k, v in report["dtypes"].items())
    quant = report["quantization"]
    if quant is None:
        quant_line = "none"
    else:
        action = "dequantized on the fly when merging" if quant["dequantizable"] else "merging into it is refused"
        quant_line = f"{quant['description']} ({action})"
    lines = [
        f"model        {report['path']}",
        f"architecture {', '.join(report['architectures'] or []) or '-'} ({report['model_type'] or '-'})",
        f"dtypes       {dtypes}" + (f"; config says {report['config_dtype']}" if report["config_dtype"] else ""),
        f"parameters   {_human(report['parameters'])} ({report['parameters']}) in {report['tensors']} tensors",
        f"size         {format_bytes(report['bytes'])} file bytes in {len(report['shards'])} file(s)"
        + (f" with index {report['index']}" if report["index"] else ""),
        f"tied embed.  {report['tied_embeddings'] if report['tied_embeddings'] is not None else '- (no config.json)'}",
        f"quantization {quant_line}",
    ]
    merged = report.get("merged_from")
    if merged:
        adapters = ", ".join(f"{a['path']} (weight {a['weight']})" for a in merged["adapters"])
        lines.append(f"merged by    lorafuse {merged['lorafuse_version']}: {merged['base']} + {adapters}")
    if len(report["shards"]) > 1:
        lines += [""] + _table(
            [[s["file"], format_bytes(s["bytes"]), str(s["tensors"])] for s in report["shards"]],
            ["shard", "file bytes", "tensors"],
        )
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The readable table for a report from :func:`inspect_path`."""
    if report["kind"] == "gguf":
        from .gguf_inspect import render_gguf

        return render_gguf(report)
    return render_adapter(report) if report["kind"] == "adapter" else render_model(report)
