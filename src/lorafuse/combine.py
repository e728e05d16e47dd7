"""``lorafuse.combine``: one LoRA adapter from several, as PEFT's ``add_weighted_adapter`` builds it.

With weights ``w_i`` and each adapter's scaling ``s_i`` (the result has scaling 1: ``lora_alpha = r``):

- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] stacked along the rank, B = [B_1, B_2, ...]. Exact: B A is the
  weighted sum of the updates. Rank = sum of the ranks.
- ``linear``: A = sum sign(w_i s_i) sqrt(|w_i s_i|) A_i, B = sum sqrt(|w_i s_i|) B_i. Needs equal ranks; an
  approximation (cross terms B_i A_j appear), as in PEFT.
- ``svd``: the weighted sum of the full updates, truncated to rank R by SVD (default: the largest input rank);
  the relative truncation error ||D - B A|| / ||D|| is reported per module.

Modules get the same rank in the output (zero rows/columns pad the smaller ones, which changes nothing), so the
adapter loads in PEFT as a plain LoRA. DoRA adapters cannot be combined this way and are refused. The math runs
on numpy in fp32 (fp64 for the svd), without torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__, arrays
from .blas_threads import BlasPool
from .edits import BiasDelta, DoraDelta, LoraDelta, Replace, RowReplace, TensorRef, require_finite
from .errors import AdapterError, LorafuseError, NonFiniteError
from .formats import read_adapter
from .formats.peft import PEFT_PREFIX
from .formats.peft_writer import write_peft_adapter
from .io.checkpoint import open_model
from .io.output import check_output
from .peft_flags import CONFIG_NAME, finite_number, load_config, strengths
from .progress import ByteBar
from .targets import EMBEDDING_SUFFIXES
from .tuners.lora_variants import VARIANT_KEYS

if TYPE_CHECKING:
    from .plan import AdapterInput

log = logging.getLogger("lorafuse")
METHODS = ("cat", "linear", "svd")


@dataclass
class CombineReport:
    """What a combine wrote."""

    method: str
    output: str
    rank: int
    modules: int
    adapters: list[dict[str, Any]]
    dtype: str
    svd_error_max: float | None = None  # relative Frobenius error of the worst module (svd only)
    svd_error_mean: float | None = None
    svd_worst_module: str | None = None
    carried_tensors: int = 0  # modules_to_save / trained biases / saved embeddings copied as they are
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lorafuse_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Factor:
    """One adapter's LoRA on one module (fp32), with the adapter weight already folded into ``scale``."""

    A: np.ndarray
    B: np.ndarray
    scale: float


@dataclass
class _Module:
    name: str
    embedding: bool
    transposed: bool
    factors: list[_Factor] = field(default_factory=list)
    bias: np.ndarray | None = None  # sum of the weighted lora_B biases (output scaling is 1)


def _module_name(target: str) -> str:
    return target.rsplit(".", 1)[0]


def _is_embedding(edit: LoraDelta, target: str) -> bool:
    return "lora_embedding" in edit.source_key or (edit.layout == "transposed" and target.endswith(EMBEDDING_SUFFIXES))


def _stored_dtype(ref: TensorRef) -> np.dtype:
    return arrays.dtype_of(ref.checkpoint.infos[ref.name].code)


def _stored(ref: TensorRef) -> np.ndarray:
    """The tensor as stored; NaN/Inf refused, naming file and tensor."""
    return require_finite(ref, ref.checkpoint.array(ref.name))


def _fp32(ref: TensorRef) -> np.ndarray:
    """The tensor in fp32 as its reference reads it (a BD-LoRA factor's stacked blocks as the whole matrix)."""
    return require_finite(ref, ref.load())


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and values (as torch.equal: -0.0 equals 0.0)."""
    if a.dtype != b.dtype:
        a, b = a.astype(np.float64), b.astype(np.float64)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _collect(
    inputs: list[AdapterInput], weights: list[float], tuners: Sequence[str | None]
) -> tuple[dict[str, _Module], dict[str, np.ndarray], list[str]]:
    """Every module's weighted factors, plus the full tensors to carry over unchanged (by their PEFT key).

    ``tuners``: each adapter's PEFT tuner type (None for other formats). An adapter of another tuner type than
    LoRA is refused by that name: its updates are no LoRA factors, and its config's keys would make the written
    config another tuner's.
    """
    modules: dict[str, _Module] = {}
    carried: dict[str, np.ndarray] = {}
    warnings: list[str] = []
    for inp, weight, tuner in zip(inputs, weights, tuners):
        carried_here = 0
        other = f"; {inp.label} is a PEFT {tuner} adapter" if tuner not in (None, "LORA") else ""
        for targeted in inp.edits:
            edit, target = targeted.edit, targeted.target
            if isinstance(edit, DoraDelta):
                raise AdapterError(
                    f"{inp.label}: {edit.source_key!r} is DoRA, whose magnitudes cannot be combined into one LoRA; "
                    "merge the adapters into the base model instead (lorafuse merge)"
                )
            if type(edit) is LoraDelta:  # a variant's subclass (KaSA) is more than its factors: refused below
                name = _module_name(target)
                module = modules.setdefault(
                    name, _Module(name, _is_embedding(edit, target), edit.layout == "transposed")
                )
                scale = finite_number(
                    edit.scale * weight,
                    f"{inp.label}: the scale of {edit.source_key!r} times its weight {weight:g}",
                    "use a smaller --weights value",
                    AdapterError,
                )
                module.factors.append(_Factor(_fp32(edit.A), _fp32(edit.B), scale))
            elif isinstance(edit, BiasDelta):
                name = _module_name(target)
                bias = _fp32(edit.b) * (edit.scale * weight)
                module = modules.get(name)
                if module is None:
                    raise AdapterError(f"{inp.label}: {edit.source_key!r} is a lora_B bias without lora weights")
                module.bias = bias if module.bias is None else module.bias + bias
            elif isinstance(edit, Replace) and edit.source_key.startswith(PEFT_PREFIX):
                tensor = _stored(edit.T)
                previous = carried.get(edit.source_key)
                if previous is not None and not _same(previous, tensor):
                    raise AdapterError(
                        f"{inp.label}: {edit.source_key!r} is also saved, with other values, by an earlier adapter; "
                        "two adapters that both train a module (modules_to_save) cannot be combined"
                    )
                carried[edit.source_key] = tensor
                # Saved copies of base layers (PEFT's save_embedding_layers) are the base itself: no weight applies.
                carried_here += ".base_layer." not in edit.source_key
            elif isinstance(edit, RowReplace):
                raise AdapterError(
                    f"{inp.label}: {edit.source_key!r} holds trained token rows (PEFT trainable tokens), which "
                    f"combine does not carry{other}; merge the adapters into the base model instead (lorafuse merge)"
                )
            else:
                kind = edit.describe().get("kind", type(edit).__name__)
                raise AdapterError(
                    f"{inp.label}: {edit.source_key or target!r} is a {kind} update, which one LoRA adapter cannot "
                    f"hold (combine sums LoRA factors only{other}); merge this adapter into the base model instead "
                    "(lorafuse merge)"
                )
        if other:  # nothing above refused it (LN tuning's saved norms read as modules_to_save): still no LoRA
            raise AdapterError(
                f"{inp.label}: a PEFT {tuner} adapter, whose updates one LoRA adapter cannot hold (combine sums LoRA "
                "factors only); merge it into the base model instead (lorafuse merge)"
            )
        if carried_here and weight != 1.0:
            warnings.append(
                f"{inp.label}: its {carried_here} full tensor(s) (modules_to_save, trained biases) are copied "
                "unweighted"
            )
    return modules, carried, warnings


def _flat(t: np.ndarray) -> np.ndarray:
    return t.reshape(t.shape[0], -1)


def _combine_module(module: _Module, method: str, rank: int | None) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The module's combined (A, B) in fp32 with scaling 1, and the svd truncation error (relative)."""
    factors = module.factors
    if method == "cat":
        return (
            np.concatenate([f.A * f.scale for f in factors], axis=0),
            np.concatenate([f.B for f in factors], axis=1),
            None,
        )
    if method == "linear":
        ranks = sorted({f.A.shape[0] for f in factors})
        if len(ranks) > 1:
            raise AdapterError(
                f"--method linear needs equal ranks, but module {module.name!r} has ranks "
                f"{', '.join(map(str, ranks))}; use --method cat or svd"
            )
        A = sum(math.copysign(math.sqrt(abs(f.scale)), f.scale) * f.A for f in factors)
        B = sum(math.sqrt(abs(f.scale)) * f.B for f in factors)
        return A, B, None  # type: ignore[return-value]
    # svd: truncate the weighted sum of the updates D = sum s_i B_i A_i, in (out, in * kernel) form. D is the
    # product of the stacked factors, so its SVD comes from QR of each side and the SVD of a small R x R core:
    # the same result as a full SVD of D, without ever forming D.
    B_cat = np.concatenate([_flat(f.B).astype(np.float64) for f in factors], axis=1)
    A_cat = np.concatenate([_flat(f.A).astype(np.float64) * f.scale for f in factors], axis=0)
    Qb, Rb = np.linalg.qr(B_cat)
    Qa, Ra = np.linalg.qr(A_cat.T)
    Uc, S, Vhc = np.linalg.svd(Rb @ Ra.T, full_matrices=False)
    k = min(rank or max(f.A.shape[0] for f in factors), int((S > 0).sum()) or 1)
    B2 = (Qb @ Uc[:, :k]) * S[:k]
    A2 = Vhc[:k] @ Qa.T
    total = float(np.sum(S * S))
    error = math.sqrt(float(np.sum(S[k:] * S[k:])) / total) if total > 0 else 0.0
    A_shape = (k, *factors[0].A.shape[1:])
    B_shape = (factors[0].B.shape[0], k, *factors[0].B.shape[2:])
    A_out = np.ascontiguousarray(A2.astype(np.float32).reshape(A_shape))
    return A_out, np.ascontiguousarray(B2.astype(np.float32).reshape(B_shape)), error


def _pad(A: np.ndarray, B: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero rows of A and columns of B up to ``rank`` (the update B A does not change)."""
    extra = rank - A.shape[0]
    if extra <= 0:
        return A, B
    A = np.concatenate([A, np.zeros((extra, *A.shape[1:]), dtype=A.dtype)], axis=0)
    B = np.concatenate([B, np.zeros((B.shape[0], extra, *B.shape[2:]), dtype=B.dtype)], axis=1)
    return A, B


def _rounded(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """fp32 ``values`` in the stored ``dtype`` (no copy when they are fp32 already)."""
    return values if values.dtype == dtype else arrays.round_to(values, dtype)


def _check_finite(tensors: dict[str, np.ndarray], dtype: np.dtype) -> None:
    """Never write a NaN/Inf adapter: finite inputs and weights can still overflow, in the stored dtype above all."""
    for key, tensor in tensors.items():
        if arrays.is_float(tensor.dtype) and not np.isfinite(tensor).all():
            raise NonFiniteError(
                f"{key} of the combined adapter holds NaN or Inf in {arrays.short_name(dtype)}: "
                "use smaller --weights, or --dtype fp32"
            )


def _first_config(path: Path) -> dict[str, Any]:
    """The first adapter's PEFT config (to keep task_type, base model ...), or {} for other formats."""
    config = path / CONFIG_NAME if path.is_dir() else None
    if config is None or not config.is_file():
        return {}
    return load_config(config).raw  # read and checked as the readers do (the adapter was read through it already)


def _peft_type(path: Path) -> str | None:
    """The PEFT tuner type of the adapter at ``path`` (``LORA``, ``IA3`` ...), None for other formats."""
    config = path / CONFIG_NAME if path.is_dir() else None
    if config is None or not config.is_file():
        return None
    return str(load_config(config).peft_type).upper()


def _output_config(
    first: dict[str, Any], rank: int, modules: dict[str, _Module], inputs: list[Path], lora_bias: bool
) -> dict[str, Any]:
    config = dict(first)
    modules_to_save: list[str] = []
    for path in inputs:
        for name in _first_config(path).get("modules_to_save") or []:
            if name not in modules_to_save:
                modules_to_save.append(name)
    config.update(
        {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": rank,
            "use_rslora": False,
            "use_dora": False,
            "lora_bias": lora_bias,
            "rank_pattern": {},
            "alpha_pattern": {},
            # Full module names: PEFT then wraps exactly the modules that have weights, whatever the inputs said.
            "target_modules": sorted(modules),
            "layers_to_transform": None,
            "layers_pattern": None,
            "exclude_modules": None,
            "fan_in_fan_out": any(m.transposed and not m.embedding for m in modules.values()),
            "modules_to_save": modules_to_save or None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
    )
    for key in VARIANT_KEYS:  # the factors written are plain LoRA ones (BD-LoRA's blocks written whole)
        if key != "use_dora":
            config.pop(key, None)
    config.setdefault("base_model_name_or_path", None)
    config.setdefault("task_type", None)
    return config


def _close(inputs: list[AdapterInput]) -> None:
    for inp in inputs:
        for targeted in inp.edits:
            for ref in targeted.edit.refs():
                ref.checkpoint.close()


def combine(
    adapters: Sequence[str | Path],
    output: str | Path,
    method: str = "cat",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    dtype: str | None = "fp32",
    overwrite: bool = False,
    adapter_format: str | None = None,
    base: str | Path | None = None,
    show_progress: bool | None = None,
) -> CombineReport:
    """Combine ``adapters`` (each times its weight) into one PEFT LoRA adapter folder at ``output``.

    ``method`` is ``cat``, ``linear`` or ``svd`` (see the module docs); ``rank`` is the svd rank (default: the
    largest input rank). ``dtype`` is the stored dtype of the new factors (``auto``: the first adapter's). ``base``
    (a model folder or weight file, read header-only) is needed only for formats whose names are resolved against
    the base (kohya). Writes atomically; refuses an existing non-empty ``output`` unless ``overwrite``.
    ``show_progress``: a bar of the factor bytes combined (None: on a terminal only).
    """
    started = time.perf_counter()
    paths = [Path(a) for a in adapters]
    if not paths:
        raise LorafuseError("no adapter given: pass at least one adapter")
    if method not in METHODS:
        raise LorafuseError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    weights = [1.0] * len(paths) if weights is None else strengths(weights, "--weights")
    if len(weights) != len(paths):
        raise LorafuseError(f"{len(weights)} weights for {len(paths)} adapters: give one weight per adapter")
    if rank is not None and (method != "svd" or rank <= 0):
        raise LorafuseError("--rank applies to --method svd only and must be a positive integer")
    out_dtype = arrays.parse_dtype(dtype)
    output = Path(output)
    checked = check_output(output, overwrite, [*paths, *([Path(base)] if base is not None else [])])

    shapes = None
    if base is not None:
        checkpoint, _prefix, _index = open_model(Path(base))
        shapes = {name: tuple(info.shape) for name, info in checkpoint.infos.items()}
        checkpoint.close()
    inputs = [read_adapter(p, label=str(p), fmt=adapter_format, base_shapes=shapes) for p in paths]
    try:
        modules, carried, warnings = _collect(inputs, weights, [_peft_type(p) for p in paths])
        if out_dtype is None:
            first = next((e.edit for e in inputs[0].edits if isinstance(e.edit, LoraDelta)), None)
            out_dtype = _stored_dtype(first.A) if first is not None else arrays.F32
    finally:
        _close(inputs)
    if not modules:
        raise AdapterError("the adapters hold no LoRA weights to combine")

    combined: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    errors: dict[str, float] = {}
    total = sum(f.A.nbytes + f.B.nbytes for m in modules.values() for f in m.factors)
    # thin QRs and small SVDs (svd): a second BLAS thread only waits
    with BlasPool().one_thread(), ByteBar(total, "combining", show_progress) as bar:
        for name, module in modules.items():
            A, B, error = _combine_module(module, method, rank)
            combined[name] = (A, B)
            if error is not None:
                errors[name] = error
            bar.update(sum(f.A.nbytes + f.B.nbytes for f in module.factors))
    out_rank = max(A.shape[0] for A, _B in combined.values())
    tensors: dict[str, np.ndarray] = {}
    for name, (A, B) in combined.items():
        A, B = _pad(A, B, out_rank)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if modules[name].embedding else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PEFT_PREFIX}{name}.{a_key}"] = _rounded(A, out_dtype)
        tensors[f"{PEFT_PREFIX}{name}.{b_key}"] = _rounded(B, out_dtype)
        bias = modules[name].bias
        if bias is not None:
            tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = _rounded(bias, out_dtype)
    for key, tensor in carried.items():
        tensors.setdefault(key, tensor)
    _check_finite(tensors, out_dtype)
    lora_bias = any(m.bias is not None for m in modules.values())
    config = _output_config(_first_config(paths[0]), out_rank, modules, paths, lora_bias)
    write_peft_adapter(output, tensors, config, checked=checked)

    for warning in warnings:
        log.warning(warning)
    report = CombineReport(
        method=method,
        output=str(output),
        rank=out_rank,
        modules=len(modules),
        adapters=[{"path": str(p), "weight": w} for p, w in zip(paths, weights)],
        dtype=arrays.short_name(out_dtype),
        carried_tensors=len(carried),
        warnings=warnings,
    )
    if errors:
        worst = max(errors, key=errors.__getitem__)
        report.svd_error_max = errors[worst]
        report.svd_error_mean = sum(errors.values()) / len(errors)
        report.svd_worst_module = worst
    report.seconds = time.perf_counter() - started
    return report
