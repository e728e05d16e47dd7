"""``lorafuse verify``: check a merged model against base + adapters.

Weight level (always; streaming, one tensor at a time, numpy only: no torch, no transformers): every merged tensor
is recomputed from the base and the adapters in fp32 with the merge plan and the numpy kernel, and compared with
what the merged files hold, read through the safetensors library itself (io/checkpoint.open_output). Error is
measured in units of the merged dtype's rounding step at the expected value (ulp); a correctly rounded merge is
within 0.5 ulp. Tensors no adapter touches must be bit-identical to the base (cast to the merged
dtype when the merge changed it).

Output level (verify_outputs.py; needs torch and transformers, and an architecture transformers loads): the merged
model and the base model with the adapters applied on the fly (:mod:`lorafuse.runtime`, or PEFT's layers for
other PEFT tuner types than LoRA) see the same inputs; max |logit diff| and top-1 agreement are reported. Where
torch or transformers is missing the check is skipped with a warning that names the install (the weight-level
verdict stands); ``outputs=False`` skips it quietly.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import BF16, F16, F32, F64, decode_f32, is_float
from .conv1d import conv1d_modules as parse_conv1d_modules
from .engine import compute_tensor
from .errors import LorafuseError
from .io.checkpoint import Checkpoint, open_model, open_output
from .io.extra_files import read_json
from .io.safetensors_file import TensorInfo
from .part_weights import set_part_weights
from .part_weights import specs_of as part_weights_of
from .plan import AdapterInput, MergePlan, OutputTensor, build_plan
from .progress import ByteBar
from .quantized import measure_fp8_scales
from .report import source_notes
from .sources import resolve_merge_inputs
from .verify_inputs import check_hashes, recorded_merge

log = logging.getLogger("lorafuse")

DEFAULT_MAX_ULP = 1.0
CORRECTLY_ROUNDED_ULP = 0.5  # what one rounding of the exact value to the merged dtype can be off by
# fp32 arithmetic noise allowed relative to a tensor's largest value (a merge that sums in another order).
FP32_NOISE = 2.0**-20
CHUNK_ELEMENTS = 1 << 20  # 4 MB fp32 chunks: cache-friendly, few parallel regions
COMPARE_CHUNK_BYTES = 16 << 20
MANTISSA_BITS = {F64: 52, F32: 23, F16: 10, BF16: 7}
MIN_EXPONENT = {F64: -1022, F32: -126, F16: -14, BF16: -126}
EXPONENT_MASK = 0x7F800000  # fp32's exponent bits: x with sign and mantissa cleared is 2^floor(log2|x|)
# Output level: max |logit diff| allowed relative to the largest reference logit, by the merged weights' dtype.
DEFAULT_LOGIT_RTOL = {F32: 1e-4, F64: 1e-4, F16: 1e-2, BF16: 5e-2}
DEFAULT_MIN_TOP1 = 0.9
WORST_SHOWN = 5
OUTPUT_CHECK_NEEDS = (
    "the output-level check needs torch and transformers: pip install 'lorafuse[torch]' transformers "
    "(--no-output-check skips it)"
)


def ulp(values: np.ndarray, dtype: np.dtype, floor: float = 0.0) -> np.ndarray:
    """The spacing of ``dtype`` numbers at the magnitude of each (finite fp32) value, as fp32, at least ``floor``.

    2^floor(log2|x|) is x with its fp32 sign and mantissa bits cleared, so this costs a mask and a multiply per
    element. Below ``dtype``'s normal range the spacing is its (constant) subnormal spacing.
    """
    dtype = np.dtype(dtype)
    power = np.bitwise_and(np.ascontiguousarray(values, dtype=F32).view(np.uint32), EXPONENT_MASK).view(F32)
    smallest = 2.0 ** (MIN_EXPONENT[dtype] - MANTISSA_BITS[dtype])
    return np.maximum(power * np.float32(2.0 ** -MANTISSA_BITS[dtype]), np.float32(max(smallest, floor)))


@dataclass
class TensorResult:
    """How one merged tensor compares with its recomputation."""

    name: str
    touched: bool
    ok: bool
    max_abs_err: float = 0.0
    max_ulp: float = 0.0
    problem: str = ""


@dataclass
class OutputCheck:
    """The output-level comparison, or why it was skipped."""

    ran: bool
    skipped_reason: str = ""
    max_logit_diff: float = 0.0
    max_logit: float = 0.0
    logit_tolerance: float = 0.0
    top1_agreement: float = 0.0
    min_top1: float = DEFAULT_MIN_TOP1
    tokens: int = 0
    method: str = ""
    ok: bool = True


@dataclass
class VerifyReport:
    """The verdict, the worst tensors and the output-level check."""

    merged: str
    base: str
    adapters: list[dict[str, Any]]
    passed: bool
    tensors_checked: int
    tensors_touched: int
    max_abs_err: float
    max_ulp: float
    max_ulp_allowed: float
    failures: list[TensorResult] = field(default_factory=list)
    worst: list[TensorResult] = field(default_factory=list)
    output: OutputCheck | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    inputs_from: str = ""  # without --adapter: what the merged folder's lorafuse_merge.json named
    training_notes: list[str] = field(default_factory=list)  # which adapter of a training output folder was taken

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failure_message(self) -> str:
        """One line naming what failed (the worst tensors first)."""
        parts = []
        if self.failures:
            named = ", ".join(f"{f.name} ({f.problem})" for f in self.failures[:3])
            more = f" and {len(self.failures) - 3} more" if len(self.failures) > 3 else ""
            parts.append(f"{len(self.failures)} tensor(s) differ from base + adapters: {named}{more}")
        if self.output is not None and self.output.ran and not self.output.ok:
            parts.append(
                f"outputs differ: max |logit diff| {self.output.max_logit_diff:.4g} (allowed "
                f"{self.output.logit_tolerance:.4g}), top-1 agreement {self.output.top1_agreement:.1%}"
            )
        hint = "; check the base, the adapters, their order and --weight values"
        return "verification failed: " + "; ".join(parts) + hint


def _compare(name: str, merged: np.ndarray, expected: np.ndarray, max_ulp: float, touched: bool) -> TensorResult:
    """Compare a merged tensor with its fp32 recomputation, in small chunks through reused buffers (fast, and
    memory stays at the two tensors)."""
    dtype = merged.dtype
    flat_m, flat_e = np.ascontiguousarray(merged).reshape(-1), np.ascontiguousarray(expected, dtype=F32).reshape(-1)
    if not flat_e.size:
        return TensorResult(name, touched, True)
    peak = max(-float(flat_e.min()), float(flat_e.max()))
    floor = FP32_NOISE * peak / max_ulp if max_ulp > 0 else 0.0
    # err / ulp = 2^k * err / max(2^E, floor * 2^k) for |e| in [2^E, 2^(E+1)): the 2^k goes on the final scalar.
    scale = 2.0 ** MANTISSA_BITS[dtype]
    least = np.float32(max(2.0 ** MIN_EXPONENT[dtype], floor * scale))
    size = min(CHUNK_ELEMENTS, flat_e.size)
    err_buf, pow_buf = np.empty(size, dtype=F32), np.empty(size, dtype=np.uint32)
    worst_abs = worst_ulp = 0.0
    for start in range(0, flat_e.size, CHUNK_ELEMENTS):
        e = flat_e[start : start + CHUNK_ELEMENTS]
        err = decode_f32(flat_m[start : start + CHUNK_ELEMENTS], dtype, out=err_buf[: e.size])
        with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf: NaN, reported below
            np.subtract(err, e, out=err)
        np.abs(err, out=err)
        chunk_abs = float(err.max())
        if not math.isfinite(chunk_abs):
            return TensorResult(name, touched, False, math.inf, math.inf, "holds NaN or Inf")
        worst_abs = max(worst_abs, chunk_abs)
        power = np.bitwise_and(e.view(np.uint32), EXPONENT_MASK, out=pow_buf[: e.size]).view(F32)
        np.maximum(power, least, out=power)
        worst_ulp = max(worst_ulp, float(np.divide(err, power, out=err).max()) * scale)
    ok = worst_ulp <= max_ulp
    problem = "" if ok else f"off by up to {worst_ulp:.3g} ulp, {worst_abs:.3g} absolute"
    return TensorResult(name, touched, ok, worst_abs, worst_ulp, problem)


def _bit_identical(merged: np.ndarray, expected: np.ndarray) -> bool:
    if merged.shape != expected.shape or merged.dtype != expected.dtype:
        return False
    as_bytes = [np.ascontiguousarray(t).reshape(-1).view(np.uint8) for t in (merged, expected)]
    return bool(np.array_equal(*as_bytes))


def _same_file_bytes(a: Checkpoint, a_info: TensorInfo, b: Checkpoint, b_info: TensorInfo) -> bool:
    """Whether two stored tensors have the same bytes, read in chunks (memory stays small for any tensor)."""
    if a_info.nbytes != b_info.nbytes:
        return False
    fd_a, fd_b = a.fd(a_info.path), b.fd(b_info.path)
    for done in range(0, a_info.nbytes, COMPARE_CHUNK_BYTES):
        size = min(COMPARE_CHUNK_BYTES, a_info.nbytes - done)
        chunk_a = os.pread(fd_a, size, a_info.offset + done)
        if len(chunk_a) != size or chunk_a != os.pread(fd_b, size, b_info.offset + done):
            return False
    return True


def check_weights(
    plan: MergePlan,
    merged: Checkpoint,
    max_ulp: float = DEFAULT_MAX_ULP,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> list[TensorResult]:
    """Compare every tensor of ``merged`` with the plan's recomputation; extra and missing tensors fail.

    ``progress`` is told the bytes of each planned tensor once it is checked.
    """
    measure_fp8_scales(plan)  # an fp8 base written back in fp8: the scales the merge recomputed
    results: list[TensorResult] = []
    for out in plan.tensors:
        results.append(_check_tensor(plan, merged, out, max_ulp, device))
        if progress is not None:
            progress(out.nbytes)
    planned = {t.name for t in plan.tensors}
    for name in merged.keys():
        if name not in planned:
            results.append(TensorResult(name, False, False, problem="not in base + adapters (unexpected tensor)"))
    return results


def _check_tensor(plan: MergePlan, merged: Checkpoint, out: OutputTensor, max_ulp: float, device: str) -> TensorResult:
    """How the merged tensor of ``out`` compares with the plan's recomputation."""
    if out.name not in merged:
        return TensorResult(out.name, bool(out.edits), False, problem="missing from the merged model")
    info = merged.infos[out.name]
    if tuple(info.shape) != tuple(out.shape):
        problem = f"shape {tuple(info.shape)}, expected {tuple(out.shape)}"
        return TensorResult(out.name, bool(out.edits), False, problem=problem)
    computed = bool(out.edits) or out.dequant is not None
    if out.encode is not None:  # re-encoded in fp8 (quantized.py): the same single rounding, bit for bit
        same = info.dtype == out.dtype and _bit_identical(merged.array(out.name), compute_tensor(plan, out))
        return TensorResult(out.name, bool(out.edits), same, problem="" if same else "not the fp8 re-encoding")
    if not is_float(info.dtype) or not (is_float(out.dtype) or computed):
        # Integer / fp8 tensors are stored as they are: bit-identical or wrong.
        if info.dtype != out.dtype or not _bit_identical(merged.array(out.name), plan.base.array(out.source)):
            return TensorResult(out.name, False, False, problem="differs from the base (should be copied)")
        return TensorResult(out.name, False, True)
    if not computed:
        # Untouched: the base tensor, cast once to the merged dtype, bit for bit.
        base_info = plan.base.infos[out.source]
        if base_info.dtype == info.dtype and base_info.offset >= 0 and info.offset >= 0:
            same = _same_file_bytes(plan.base, base_info, merged, info)
        else:
            same = _bit_identical(merged.array(out.name), compute_tensor(plan, replace(out, dtype=info.dtype)))
        problem = "" if same else "untouched by the adapters but not bit-identical to the base"
        return TensorResult(out.name, False, same, problem=problem)
    expected = compute_tensor(plan, replace(out, dtype=F32), device)
    return _compare(out.name, merged.array(out.name), expected, max_ulp, bool(out.edits))


def _load_adapters(
    adapters: Sequence[str | Path], weights: list[float], adapter_format: str | None, base: Checkpoint
) -> list[AdapterInput]:
    from .formats import read_adapter

    if len(weights) != len(adapters):
        raise LorafuseError(f"{len(weights)} weights for {len(adapters)} adapters: give one --weight per adapter")
    shapes = {name: info.shape for name, info in base.infos.items()}
    return [
        read_adapter(Path(a), label=str(a), fmt=adapter_format, weight=float(w), base_shapes=shapes)
        for a, w in zip(adapters, weights)
    ]


def verify(
    merged: str | Path,
    base: str | Path | None = None,
    adapters: Sequence[str | Path] | None = None,
    weights: Sequence[float] | None = None,
    adapter_format: str | None = None,
    max_ulp: float = DEFAULT_MAX_ULP,
    outputs: bool = True,
    prompts: Sequence[str] | None = None,
    logit_rtol: float | None = None,
    min_top1: float = DEFAULT_MIN_TOP1,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    allow_unmatched: bool = False,
    conv1d_modules: str | Sequence[str] | None = None,
    show_progress: bool | None = None,
    part_weights: Sequence[Any] | None = None,
) -> VerifyReport:
    """Verify that ``merged`` is ``base`` with ``adapters`` merged in order with ``weights``.

    Without ``adapters`` (and ``base`` and ``weights``), the merge ``merged`` records in its lorafuse_merge.json
    is checked (verify_inputs.py; ``report.inputs_from`` says so): its base, adapters (their files must still
    have the recorded sha256), weights, formats and plan options.

    ``base`` and ``adapters`` are any sources ``lorafuse.merge`` takes (local paths, Hub or ModelScope ids, git
    URLs; ``cache_dir`` for downloads); ``base=None`` takes the base named in the first adapter's config.
    ``allow_unmatched`` skips adapter tensors the base has no target for, as ``lorafuse merge --allow-unmatched``;
    ``conv1d_modules`` names the base's Conv1D modules, as ``lorafuse merge --conv1d-modules``. Returns a
    :class:`VerifyReport` (``passed`` is the verdict); raises :class:`LorafuseError` on unreadable inputs.
    ``outputs=False`` skips the output-level check; ``show_progress``: the weight check's bar (None: on a
    terminal only). ``part_weights``: the merge's per-part strengths (``lorafuse merge --part-weight``).
    """
    started = time.perf_counter()
    if not Path(merged).exists():  # before any download
        raise LorafuseError(f"{merged}: no such merged model; pass the folder or file that lorafuse merge wrote")
    if Path(merged).suffix == ".gguf":  # llama.cpp's format: checked in gguf_verify.py
        from .gguf_verify import verify_gguf

        args = (merged, base, adapters, weights, adapter_format, cache_dir, allow_unmatched, conv1d_modules)
        return verify_gguf(*args)
    recorded = None
    if not adapters:
        if base is not None or weights is not None:
            raise LorafuseError(
                "--base or --weight without --adapter: pass the merged adapters with --adapter, in merge order, or "
                "none of these to verify against what the merged folder's lorafuse_merge.json records"
            )
        recorded = recorded_merge(Path(merged))
        log.info("verifying against %s", recorded.describe())
        base, adapters, weights = recorded.base, recorded.adapters, recorded.weights
        adapter_format = adapter_format or recorded.adapter_format
        allow_unmatched = allow_unmatched or recorded.allow_unmatched
        conv1d_modules = conv1d_modules if conv1d_modules is not None else recorded.conv1d_modules
        part_weights = part_weights if part_weights is not None else recorded.part_weights
    conv1d = parse_conv1d_modules(conv1d_modules)
    sources = resolve_merge_inputs(base, adapters, adapter_format=adapter_format, cache_dir=cache_dir)
    try:
        if recorded is not None:
            check_hashes(recorded, sources.adapters)
        report = _verify_local(
            Path(merged),
            sources.base,
            sources.adapters,
            weights,
            adapter_format,
            max_ulp,
            outputs,
            prompts,
            logit_rtol,
            min_top1,
            device,
            allow_unmatched=allow_unmatched,
            conv1d_modules=conv1d,
            show_progress=show_progress,
            part_weights=part_weights,
        )
    finally:
        sources.cleanup()
    report.training_notes = source_notes(sources.provenance)
    if recorded is not None:
        report.inputs_from = recorded.describe()
    report.seconds = time.perf_counter() - started
    return report


def _verify_local(
    merged_path: Path,
    base_path: Path,
    adapters: Sequence[Path],
    weights: Sequence[float] | None,
    adapter_format: str | None,
    max_ulp: float,
    outputs: bool,
    prompts: Sequence[str] | None,
    logit_rtol: float | None,
    min_top1: float,
    device: str,
    *,
    allow_unmatched: bool = False,
    conv1d_modules: frozenset[str] | None = None,
    show_progress: bool | None = None,
    part_weights: Sequence[Any] | None = None,
) -> VerifyReport:
    weight_list = list(weights) if weights is not None else [1.0] * len(adapters)
    base_ckpt, _, _ = open_model(base_path)
    inputs: list[AdapterInput] = []
    try:  # through the safetensors library, not the merge's own reader: a header it wrote wrongly is caught
        merged_ckpt = open_output(merged_path)
    except LorafuseError:
        base_ckpt.close()
        raise
    try:
        inputs = _load_adapters(adapters, weight_list, adapter_format, base_ckpt)
        set_part_weights(inputs, part_weights_of(part_weights, len(inputs)))  # merge's --part-weight
        base_config = read_json(base_path / "config.json") if base_path.is_dir() else None
        plan = build_plan(
            base_ckpt,
            inputs,
            None,
            base_config,
            check_values=False,
            allow_unmatched=allow_unmatched,
            conv1d_modules=conv1d_modules,
        )
        with ByteBar(plan.total_bytes, "verifying", show_progress) as bar:
            results = check_weights(plan, merged_ckpt, max_ulp, device, bar.update)
        plan_warnings = list(plan.warnings)
    finally:
        base_ckpt.close()
        merged_ckpt.close()
        for inp in inputs:
            _close_adapter(inp)
    touched = [r for r in results if r.touched]
    failures = sorted((r for r in results if not r.ok), key=lambda r: (-r.max_ulp, r.name))
    report = VerifyReport(
        merged=str(merged_path),
        base=str(base_path),
        adapters=[{"path": str(a), "weight": float(w)} for a, w in zip(adapters, weight_list)],
        passed=not failures,
        tensors_checked=len(results),
        tensors_touched=len(touched),
        max_abs_err=max((r.max_abs_err for r in touched), default=0.0),
        max_ulp=max((r.max_ulp for r in touched), default=0.0),
        max_ulp_allowed=max_ulp,
        failures=failures,
        worst=sorted(touched, key=lambda r: (-r.max_ulp, r.name))[:WORST_SHOWN],
        warnings=plan_warnings,
    )
    if outputs:
        report.output = _output_check(
            merged_path, base_path, list(adapters), weight_list, prompts, logit_rtol, min_top1, device, adapter_format
        )
        report.passed = report.passed and report.output.ok
    return report


def _output_check(merged_path: Path, base_path: Path, *args: Any) -> OutputCheck:
    """verify_outputs.check_outputs, or, without torch or transformers, a skip that warns and names the install
    (the weight-level verdict stands: the weights are checked in full, the outputs only where they can be)."""
    try:
        from .verify_outputs import check_outputs  # imports torch and transformers
    except ImportError:
        log.warning(OUTPUT_CHECK_NEEDS)
        return OutputCheck(False, OUTPUT_CHECK_NEEDS)
    return check_outputs(merged_path, base_path, *args)


def render(report: VerifyReport) -> str:
    """A readable summary of a :class:`VerifyReport`."""
    lines = [
        f"merged       {report.merged}",
        *([f"inputs       {report.inputs_from}"] if report.inputs_from else []),
        f"base         {report.base}",
        "adapters     " + ", ".join(f"{a['path']} (weight {a['weight']:g})" for a in report.adapters),
        *[f"note: {note}" for note in report.training_notes],
        f"weights      {report.tensors_checked} tensors checked, {report.tensors_touched} changed by the adapters; "
        f"max error {report.max_abs_err:.3g} = {report.max_ulp:.3g} ulp (allowed {report.max_ulp_allowed:g})",
    ]
    out = report.output
    if out is not None:
        if out.ran:
            lines.append(
                f"outputs      {out.method}: max |logit diff| {out.max_logit_diff:.4g} "
                f"(allowed {out.logit_tolerance:.4g}), "
                f"top-1 agreement {out.top1_agreement:.1%} over {out.tokens} tokens (needs {out.min_top1:.0%})"
            )
        else:
            lines.append(f"outputs      skipped: {out.skipped_reason}")
    lines += [f"note: {warning}" for warning in report.warnings]
    # A correctly rounded merge is within 0.5 ulp everywhere: only tensors beyond that are worth a look.
    beyond = [r for r in report.worst if r.max_ulp > CORRECTLY_ROUNDED_ULP]
    if beyond:
        lines.append(f"tensors beyond correct rounding ({CORRECTLY_ROUNDED_ULP:g} ulp), worst first:")
        lines += [f"  {r.name}: {r.max_ulp:.3g} ulp, {r.max_abs_err:.3g} abs" for r in beyond]
    elif report.tensors_touched and not any(f.touched for f in report.failures):
        lines.append(f"every changed tensor is correctly rounded (within {CORRECTLY_ROUNDED_ULP:g} ulp)")
    for failure in report.failures[:20]:
        lines.append(f"FAIL {failure.name}: {failure.problem}")
    if len(report.failures) > 20:
        lines.append(f"FAIL ... and {len(report.failures) - 20} more")
    lines.append("PASSED" if report.passed else "FAILED")
    return "\n".join(lines)


def _close_adapter(adapter: AdapterInput) -> None:
    for targeted in adapter.edits:
        for ref in targeted.edit.refs():
            ref.checkpoint.close()
