"""``lorafuse.extract``: the difference between a tuned model and its base, as a LoRA adapter.

The two checkpoints are streamed tensor by tensor (never more than one pair in memory): unchanged tensors are
recognised from their bytes and skipped, 1-D and small tensors are stored as full differences, and every other
changed weight is factorised to rank R (randomized SVD by default, optionally a dynamic rank holding a fraction
of the difference's energy). Output formats: a PEFT adapter folder, the ``diffusion_model.`` single file, or a
kohya single file.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .dtypes import is_float, parse_dtype
from .errors import AdapterError, LorafuseError
from .io.checkpoint import Checkpoint, open_model
from .io.extra_files import read_json
from .io.output import AtomicOutput, check_output
from .io.safetensors_file import TensorInfo, pread_into
from .io.spool import SpoolWriter
from .plan import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING

log = logging.getLogger("lorafuse")

EXTRACT_FORMATS = ("peft", "diffusion", "kohya")
SINGLE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
PEFT_PREFIX = "base_model.model."
DIFFUSION_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
DIFF_SUFFIX = {"weight": "diff", "bias": "diff_b", "modulation": "diff_m"}
COMPARE_CHUNK = 32 << 20


@dataclass
class TensorResult:
    """What extraction did with one base tensor."""

    name: str
    kind: str  # lora, diff, similar, tied, skipped, failed
    shape: tuple[int, ...]
    rank: int = 0
    rel_error: float = 0.0  # ||delta - stored|| / ||delta||
    delta_norm: float = 0.0
    note: str = ""


@dataclass
class ExtractReport:
    """Statistics of an extraction (the old script's counters plus approximation errors)."""

    base: str
    tuned: str
    output: str
    format: str
    rank: int
    processed: int = 0
    direct_diff: int = 0
    lora: int = 0
    skipped: int = 0
    similar: int = 0
    failed: int = 0
    tied: int = 0
    rel_error: float = 0.0  # overall: sqrt(sum ||delta - stored||^2) / sqrt(sum ||delta||^2)
    adapter_bytes: int = 0
    tensors_written: int = 0
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors: list[TensorResult] = field(default_factory=list)
    seconds: float = 0.0
    lorafuse_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def count(self, result: TensorResult) -> None:
        self.tensors.append(result)
        attr = {"diff": "direct_diff"}.get(result.kind, result.kind)
        setattr(self, attr, getattr(self, attr) + 1)
        if result.kind in ("lora", "diff", "failed"):
            self.processed += 1


@dataclass
class Factors:
    """delta ~= up @ down (``up``: out x k, ``down``: k x in)."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor


def low_rank(
    matrix: torch.Tensor,
    rank: int,
    *,
    exact: bool = False,
    energy: float | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> Factors:
    """Best rank-``rank`` factors of a 2-D fp32 ``matrix`` (randomized SVD unless ``exact``).

    With ``energy``, keeps the smallest rank whose singular values hold that fraction of ``||matrix||_F^2``
    (never more than ``rank``). The singular values are split evenly: up = U sqrt(S), down = sqrt(S) V^T.
    """
    m, n = matrix.shape
    k_max = max(1, min(rank, m, n))
    width = min(k_max + oversample, m, n)
    if exact or width >= min(m, n):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        gen = torch.Generator(device=matrix.device).manual_seed(seed)
        omega = torch.randn(n, width, generator=gen, device=matrix.device, dtype=matrix.dtype)
        basis = torch.linalg.qr(matrix @ omega).Q
        for _ in range(power_iters):  # power iterations sharpen the subspace when the spectrum decays slowly
            basis = torch.linalg.qr(matrix.T @ basis).Q
            basis = torch.linalg.qr(matrix @ basis).Q
        small_u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
        u = basis @ small_u
    k = k_max
    if energy is not None:
        total = float(matrix.square().sum())
        if total > 0:
            kept = torch.cumsum(s.double().square(), 0) / total
            k = min(k_max, int((kept < energy).sum()) + 1)
    root = s[:k].sqrt()
    return Factors(u[:, :k] * root, root[:, None] * vh[:k], s[:k])


def _tensor_seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed) & 0x7FFFFFFF


@functools.cache
def _compare_buffers() -> tuple[bytearray, bytearray]:
    # Reused for every comparison: fresh 32 MB buffers per chunk would cost page faults on every read.
    return bytearray(COMPARE_CHUNK), bytearray(COMPARE_CHUNK)


def _same_values(base: Checkpoint, tuned: Checkpoint, bname: str, tname: str) -> bool:
    """True when the two tensors hold identical values (bytes compared in chunks for safetensors)."""
    bi, ti = base.infos[bname], tuned.infos[tname]
    if bi.dtype == ti.dtype and bi.offset >= 0 and ti.offset >= 0:
        if bi.nbytes != ti.nbytes:
            return False
        bfd, tfd = base.fd(bi.path), tuned.fd(ti.path)
        left, right = _compare_buffers()
        for start in range(0, bi.nbytes, COMPARE_CHUNK):
            size = min(COMPARE_CHUNK, bi.nbytes - start)
            a, b = memoryview(left)[:size], memoryview(right)[:size]
            pread_into(bfd, a, bi.offset + start, bi.path)
            pread_into(tfd, b, ti.offset + start, ti.path)
            if a != b:
                return False
        return True
    a, b = base.get(bname), tuned.get(tname)
    if a.dtype != b.dtype:
        return bool(torch.equal(a.float(), b.float()))
    return bool(torch.equal(a, b))


def _embedding_key(keys: list[str]) -> str | None:
    found = [k for k in keys if k.endswith(EMBEDDING_SUFFIXES)]
    return found[0] if len(found) == 1 else None


def _module_of(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


class _Layout:
    """Names and shapes of stored tensors for one output format."""

    def __init__(self, fmt: str):
        self.fmt = fmt

    def lora_names(self, module: str) -> tuple[str, str, str | None]:
        """(up name, down name, alpha name or None)."""
        if self.fmt == "peft":
            return f"{PEFT_PREFIX}{module}.lora_B.weight", f"{PEFT_PREFIX}{module}.lora_A.weight", None
        if self.fmt == "kohya":
            flat = KOHYA_PREFIX + module.replace(".", "_")
            return f"{flat}.lora_up.weight", f"{flat}.lora_down.weight", f"{flat}.alpha"
        return f"{DIFFUSION_PREFIX}{module}.lora_up.weight", f"{DIFFUSION_PREFIX}{module}.lora_down.weight", None

    def diff_name(self, name: str) -> str | None:
        """Name of a full difference of base tensor ``name`` (None when the format cannot name it)."""
        module, attr = _module_of(name)
        suffix = DIFF_SUFFIX.get(attr)
        if suffix is None or not module:
            return None
        if self.fmt == "kohya":
            return f"{KOHYA_PREFIX}{module.replace('.', '_')}.{suffix}"
        return f"{DIFFUSION_PREFIX}{module}.{suffix}"


@dataclass
class _PeftState:
    """What a PEFT adapter config needs to know, gathered while streaming."""

    ranks: dict[str, int] = field(default_factory=dict)  # LoRA module -> rank
    embeddings: set[str] = field(default_factory=set)
    diffs: dict[str, torch.dtype] = field(default_factory=dict)  # changed small tensors -> output dtype


def extract(
    base: str | Path,
    tuned: str | Path,
    output: str | Path,
    rank: int = 16,
    fmt: str = "peft",
    *,
    energy: float | None = None,
    exact_svd: bool = False,
    device: str = "cpu",
    min_params: int = 1_000_000,
    diff_only: bool = False,
    dtype: str | None = "auto",
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    base_name: str | None = None,
    show_progress: bool | None = None,
) -> ExtractReport:
    """Extract ``tuned - base`` as an adapter written to ``output``.

    ``fmt``: ``peft`` (an adapter folder), ``diffusion`` or ``kohya`` (a single ``.safetensors``/``.pt`` file;
    ``.safetensors`` is appended when the name has no such suffix). ``dtype``: ``auto`` stores LoRA factors in
    the tuned tensor's dtype and full differences in fp32 (so they round-trip exactly); or bf16/fp16/fp32 for all.
    """
    started = time.perf_counter()
    if fmt not in EXTRACT_FORMATS:
        raise LorafuseError(f"unknown adapter format {fmt!r}: use one of {', '.join(EXTRACT_FORMATS)}")
    if rank < 1:
        raise LorafuseError(f"--rank must be at least 1 (got {rank})")
    if energy is not None and not 0 < energy <= 1:
        raise LorafuseError(f"--energy must be in (0, 1] (got {energy})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LorafuseError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    out_dtype = parse_dtype(dtype)
    base_path, tuned_path, output_path = Path(base), Path(tuned), Path(output)
    if fmt != "peft" and not output_path.name.endswith(SINGLE_FILE_SUFFIXES):
        output_path = output_path.with_name(output_path.name + ".safetensors")
    check_output(output_path, overwrite, [base_path, tuned_path])

    base_ckpt, _prefix, _ = open_model(base_path)
    tuned_ckpt: Checkpoint | None = None
    report = ExtractReport(str(base_path), str(tuned_path), str(output_path), fmt, rank)
    try:
        tuned_ckpt, _tprefix, _ = open_model(tuned_path)
        base_only = [k for k in base_ckpt.keys() if k not in tuned_ckpt]
        tuned_only = [k for k in tuned_ckpt.keys() if k not in base_ckpt]
        if base_only:
            report.warnings.append(f"{len(base_only)} tensors only in the base model, e.g. {base_only[:3]}")
        if tuned_only:
            report.warnings.append(
                f"{len(tuned_only)} tensors only in the tuned model (not extracted), e.g. {tuned_only[:3]}"
            )
        is_dir = fmt == "peft"
        with AtomicOutput(output_path, is_dir=is_dir) as out:
            spool_dir = out.tmp if is_dir else out.tmp.parent
            spool = SpoolWriter(spool_dir / f".{output_path.name}.lorafuse-spool-{os.getpid()}")
            try:
                settings = _Settings(
                    rank, energy, exact_svd, device, min_params, diff_only, out_dtype, oversample, power_iters, seed
                )
                peft_state = _stream(base_ckpt, tuned_ckpt, spool, _Layout(fmt), settings, report, show_progress)
                if is_dir:
                    config = _peft_finish(
                        base_ckpt, tuned_ckpt, spool, peft_state, settings, base_path, base_name, report
                    )
                    report.adapter_bytes = spool.nbytes
                    report.tensors_written = len(spool)
                    spool.finish(out.tmp / "adapter_model.safetensors")
                    (out.tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
                    report.files = ["adapter_config.json", "adapter_model.safetensors"]
                else:
                    report.adapter_bytes = spool.nbytes
                    report.tensors_written = len(spool)
                    spool.finish(out.tmp, pickle=output_path.suffix in (".pt", ".pth"))
                    report.files = [output_path.name]
            finally:
                spool.close()
            if report.tensors_written == 0:
                report.warnings.append("the tuned model does not differ from the base: the adapter is empty")
            report.seconds = time.perf_counter() - started
            if is_dir:
                (out.tmp / "lorafuse_extract.json").write_text(json.dumps(_provenance(report), indent=2) + "\n")
                report.files.append("lorafuse_extract.json")
            out.commit()
    finally:
        base_ckpt.close()
        if tuned_ckpt is not None:
            tuned_ckpt.close()
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Settings:
    rank: int
    energy: float | None
    exact_svd: bool
    device: str
    min_params: int
    diff_only: bool
    out_dtype: torch.dtype | None
    oversample: int
    power_iters: int
    seed: int


def _provenance(report: ExtractReport) -> dict[str, Any]:
    """The report, with unchanged tensors left out of the per-tensor list."""
    data = report.to_dict()
    data["tensors"] = [t for t in data["tensors"] if t["kind"] != "similar"]
    return data


def _stream(
    base: Checkpoint,
    tuned: Checkpoint,
    spool: SpoolWriter,
    layout: _Layout,
    settings: _Settings,
    report: ExtractReport,
    show_progress: bool | None,
) -> _PeftState:
    state = _PeftState()
    keys = base.keys()
    embedding = _embedding_key(keys)
    disable = None if show_progress is None else not show_progress
    for name in tqdm(keys, desc="extracting", unit="tensor", disable=disable, leave=False):
        if name not in tuned:
            continue
        binfo, tinfo = base.infos[name], tuned.infos[name]
        if binfo.shape != tinfo.shape:
            report.count(TensorResult(name, "skipped", binfo.shape, note=f"shape {binfo.shape} vs tuned {tinfo.shape}"))
            report.warnings.append(f"{name}: shape {binfo.shape} in the base but {tinfo.shape} in the tuned model")
            continue
        if _same_values(base, tuned, name, name):
            report.count(TensorResult(name, "similar", binfo.shape))
            continue
        if not (is_float(binfo.dtype) and is_float(tinfo.dtype)):
            report.count(TensorResult(name, "skipped", binfo.shape, note=f"{binfo.dtype} values cannot be differenced"))
            report.warnings.append(f"{name}: non-float tensor ({binfo.dtype}) changed; it cannot be extracted")
            continue
        if _is_tied_head(name, embedding, base, tuned):
            report.count(TensorResult(name, "tied", binfo.shape, note=f"tied to {embedding}"))
            continue
        result = _extract_one(name, binfo, tinfo, base, tuned, spool, layout, settings, state)
        report.count(result)
    report.rel_error = overall_error(report.tensors)
    return state


def overall_error(results: list[TensorResult]) -> float:
    """sqrt(sum ||delta - stored||^2 / sum ||delta||^2) over every extracted tensor."""
    total = sum(t.delta_norm**2 for t in results)
    err = sum((t.rel_error * t.delta_norm) ** 2 for t in results)
    return math.sqrt(err / total) if total > 0 else 0.0


def _is_tied_head(name: str, embedding: str | None, base: Checkpoint, tuned: Checkpoint) -> bool:
    """An lm_head saved beside the embedding it is tied to, equal to it in both models: stored once."""
    if name != OUTPUT_EMBEDDING or embedding is None or embedding not in tuned:
        return False
    if base.infos[embedding].shape != base.infos[name].shape:
        return False
    return _same_values(base, base, embedding, name) and _same_values(tuned, tuned, embedding, name)


def _extract_one(
    name: str,
    binfo: TensorInfo,
    tinfo: TensorInfo,
    base: Checkpoint,
    tuned: Checkpoint,
    spool: SpoolWriter,
    layout: _Layout,
    settings: _Settings,
    state: _PeftState,
) -> TensorResult:
    delta = tuned.get(name).to(device=settings.device, dtype=torch.float32)
    delta.sub_(base.get(name).to(settings.device))  # fp32 -= bf16 computes in fp32, without an fp32 copy
    norm = float(torch.linalg.vector_norm(delta))
    shape = tuple(binfo.shape)
    numel = delta.numel()
    if settings.diff_only or delta.dim() < 2 or numel < settings.min_params:
        stored_dtype = settings.out_dtype or torch.float32
        if layout.fmt == "peft":
            state.diffs[name] = stored_dtype  # written at the end, as modules_to_save or lora_B.bias
            rounded = delta.to(stored_dtype).float()
        else:
            key = layout.diff_name(name)
            if key is None:
                # As the old extractor: only .weight/.bias/.modulation have a difference name.
                return TensorResult(name, "skipped", shape, note="no difference name for this tensor in this format")
            rounded = delta.to(stored_dtype)
            spool.add(key, rounded)
            rounded = rounded.float()
        err = float(torch.linalg.vector_norm(delta - rounded)) / norm if norm else 0.0
        return TensorResult(name, "diff", shape, rel_error=err, delta_norm=norm)
    module, attr = _module_of(name)
    if attr != "weight" or not module:
        return TensorResult(name, "failed", shape, delta_norm=norm, note="only .weight tensors are factorised")
    embedding = layout.fmt == "peft" and name.endswith(EMBEDDING_SUFFIXES) and delta.dim() == 2
    matrix = delta.T if embedding else delta.reshape(delta.shape[0], -1)
    factors = low_rank(
        matrix,
        settings.rank,
        exact=settings.exact_svd,
        energy=settings.energy,
        oversample=settings.oversample,
        power_iters=settings.power_iters,
        seed=_tensor_seed(name, settings.seed),
    )
    stored_dtype = settings.out_dtype or tinfo.dtype
    up, down = factors.up.to(stored_dtype), factors.down.to(stored_dtype)
    err = float(torch.linalg.vector_norm(matrix - up.float() @ down.float())) / norm if norm else 0.0
    k = up.shape[1]
    if delta.dim() > 2:  # Conv: down (k, in, *kernel), up (out, k, 1, ...)
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(*up.shape, *([1] * (delta.dim() - 2)))
    up_name, down_name, alpha_name = layout.lora_names(module)
    if embedding:
        up_name = f"{PEFT_PREFIX}{module}.lora_embedding_B"
        down_name = f"{PEFT_PREFIX}{module}.lora_embedding_A"
        state.embeddings.add(module)
    spool.add(down_name, down)
    spool.add(up_name, up)
    if alpha_name is not None:
        spool.add(alpha_name, torch.tensor(float(k), dtype=torch.float32))
    state.ranks[module] = k
    return TensorResult(name, "lora", shape, rank=k, rel_error=err, delta_norm=norm)


def _peft_finish(
    base: Checkpoint,
    tuned: Checkpoint,
    spool: SpoolWriter,
    state: _PeftState,
    settings: _Settings,
    base_path: Path,
    base_name: str | None,
    report: ExtractReport,
) -> dict[str, Any]:
    """Write the full differences a PEFT adapter can carry exactly, and build adapter_config.json.

    A changed bias of a LoRA module becomes ``lora_B.bias`` (PEFT ``lora_bias``) when every LoRA layer has a bias
    (PEFT cannot merge it otherwise; then such modules are stored whole). Any other changed small tensor makes its
    module a ``modules_to_save`` entry, which stores every parameter of that module (tuned values).
    """
    keys = base.keys()
    modules_to_save: list[str] = []
    biased = [m for m in state.ranks if f"{m}.bias" in state.diffs and m not in state.embeddings]
    # PEFT cannot merge lora_bias into a layer without a bias: then store those modules whole instead.
    lora_bias = bool(biased) and all(f"{m}.bias" in base for m in state.ranks)
    if biased and not lora_bias:
        for module in biased:
            up, down, _ = _Layout("peft").lora_names(module)
            spool.discard(up)
            spool.discard(down)
            del state.ranks[module]
            state.diffs[f"{module}.weight"] = settings.out_dtype or tuned.infos[f"{module}.weight"].dtype
            for result in report.tensors:
                if result.name == f"{module}.weight":
                    result.kind, result.rank, result.rel_error, result.note = "diff", 0, 0.0, "modules_to_save"
                    report.lora -= 1
                    report.direct_diff += 1
    for name in state.diffs:
        module, attr = _module_of(name)
        if lora_bias and module in state.ranks and attr == "bias":
            continue
        if module in state.ranks or module in modules_to_save:
            if module in state.ranks:
                raise AdapterError(
                    f"{name} changed in a module whose weight is a LoRA; the PEFT format cannot hold both: "
                    "use --format diffusion"
                )
            continue
        children = [k for k in keys if k.startswith(module + ".")]
        if not module or any("." in k[len(module) + 1 :] for k in children):
            raise AdapterError(
                f"{name} changed but its module holds sub-modules, so PEFT's modules_to_save would copy all of "
                "them: use --format diffusion (or --format kohya) for this model"
            )
        modules_to_save.append(module)
    for module in modules_to_save:
        for key in (k for k in keys if k.rpartition(".")[0] == module):
            value = tuned.get(key)
            dtype = state.diffs.get(key) or settings.out_dtype or value.dtype
            spool.add(f"{PEFT_PREFIX}{key}", value.to(dtype))
    if lora_bias:
        for module in state.ranks:
            bias = f"{module}.bias"
            if bias in state.diffs:
                delta = tuned.get(bias).float() - base.get(bias).float()
                spool.add(f"{PEFT_PREFIX}{module}.lora_B.bias", delta.to(state.diffs[bias]))
            elif bias in base:  # zeros keep PEFT from reporting missing keys; layers without a bias get none
                spool.add(
                    f"{PEFT_PREFIX}{module}.lora_B.bias", torch.zeros(base.infos[bias].shape, dtype=torch.float32)
                )
    report.rel_error = overall_error(report.tensors)
    return _peft_config(keys, state, settings, base_path, base_name, sorted(modules_to_save), lora_bias)


def _peft_config(
    keys: list[str],
    state: _PeftState,
    settings: _Settings,
    base_path: Path,
    base_name: str | None,
    modules_to_save: list[str],
    lora_bias: bool,
) -> dict[str, Any]:
    ranks = state.ranks
    r = max(ranks.values(), key=list(ranks.values()).count) if ranks else settings.rank  # the most common rank
    pattern = {m: k for m, k in ranks.items() if k != r}
    base_config = read_json(base_path / "config.json") if base_path.is_dir() else None
    architectures = (base_config or {}).get("architectures") or []
    task_type = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name or (base_config or {}).get("_name_or_path") or str(base_path),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = rank everywhere: every module's scale is 1
        "target_modules": _target_modules(keys, ranks),
        "modules_to_save": modules_to_save or None,
        "lora_bias": lora_bias,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _target_modules(keys: list[str], ranks: dict[str, int]) -> list[str]:
    """Short names (``q_proj``) when every base module of that name has a LoRA, else full module names."""
    if not ranks:
        return []
    leaves = {m.rpartition(".")[2] for m in ranks}
    weights = {k[: -len(".weight")] for k in keys if k.endswith(".weight")}
    all_covered = all(m in ranks for m in weights if m.rpartition(".")[2] in leaves)
    return sorted(leaves) if all_covered else sorted(ranks)
