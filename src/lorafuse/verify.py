"""``lorafuse verify``: check a merged model against base + adapters.

Weight level (always; streaming, one tensor at a time, no transformers needed): every merged tensor is recomputed
from the base and the adapters in fp32 with the merge plan and engine, and compared with what the merged files
hold. Error is measured in units of the merged dtype's rounding step at the expected value (ulp); a correctly
rounded merge is within 0.5 ulp. Tensors no adapter touches must be bit-identical to the base (cast to the merged
dtype when the merge changed it).

Output level (when transformers is installed and the architecture loads): the merged model and the base model
with the adapters applied on the fly (:mod:`lorafuse.runtime`) see the same inputs; max |logit diff| and top-1
agreement are reported.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .dtypes import is_float
from .engine import compute_tensor
from .errors import LorafuseError
from .io.checkpoint import Checkpoint, open_model, open_output
from .io.extra_files import read_json
from .io.safetensors_file import TensorInfo
from .plan import AdapterInput, MergePlan, build_plan
from .quantized import find_quantization_config
from .sources import resolve_merge_inputs

log = logging.getLogger("lorafuse")

DEFAULT_MAX_ULP = 1.0
# fp32 arithmetic noise allowed relative to a tensor's largest value (a merge that sums in another order).
FP32_NOISE = 2.0**-20
CHUNK_ELEMENTS = 1 << 20  # 4 MB fp32 chunks: cache-friendly, few parallel regions
COMPARE_CHUNK_BYTES = 16 << 20
MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
MIN_EXPONENT = {torch.float64: -1022, torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}
# Output level: max |logit diff| allowed relative to the largest reference logit, by the merged weights' dtype.
DEFAULT_LOGIT_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEFAULT_MIN_TOP1 = 0.9
WORST_SHOWN = 5


def ulp(values: torch.Tensor, dtype: torch.dtype, floor: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at the magnitude of each (finite fp32) value, as fp32, at least ``floor``.

    2^floor(log2|x|) is x with its fp32 sign and mantissa bits cleared, so this costs a mask and a multiply per
    element. Below ``dtype``'s normal range the spacing is its (constant) subnormal spacing. ``out`` is an int32
    scratch tensor of the same size to reuse.
    """
    bits = values.float().contiguous().view(torch.int32)
    out = torch.bitwise_and(bits, 0x7F800000, out=out)
    smallest = 2.0 ** (MIN_EXPONENT[dtype] - MANTISSA_BITS[dtype])
    return out.view(torch.float32).mul_(2.0 ** -MANTISSA_BITS[dtype]).clamp_(min=max(smallest, floor))


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


def _compare(name: str, merged: torch.Tensor, expected: torch.Tensor, max_ulp: float, touched: bool) -> TensorResult:
    """Compare a merged tensor with its fp32 recomputation, in small chunks through reused buffers (fast, and
    memory stays at the two tensors)."""
    dtype = merged.dtype
    flat_m, flat_e = merged.reshape(-1), expected.reshape(-1)
    if not flat_e.numel():
        return TensorResult(name, touched, True)
    low, high = torch.aminmax(flat_e)
    floor = FP32_NOISE * max(-float(low), float(high)) / max_ulp if max_ulp > 0 else 0.0
    # err / ulp = 2^k * err / max(2^E, floor * 2^k) for |e| in [2^E, 2^(E+1)): the 2^k goes on the final scalar.
    scale = 2.0 ** MANTISSA_BITS[dtype]
    smallest = 2.0 ** MIN_EXPONENT[dtype]
    size = min(CHUNK_ELEMENTS, flat_e.numel())
    err_buf, pow_buf = torch.empty(size), torch.empty(size, dtype=torch.int32)
    worst_abs = worst_ulp = 0.0
    for start in range(0, flat_e.numel(), CHUNK_ELEMENTS):
        e = flat_e[start : start + CHUNK_ELEMENTS]
        err = err_buf[: e.numel()]
        chunk_abs = float(err.copy_(flat_m[start : start + CHUNK_ELEMENTS]).sub_(e).abs_().max())
        if not math.isfinite(chunk_abs):
            return TensorResult(name, touched, False, math.inf, math.inf, "holds NaN or Inf")
        worst_abs = max(worst_abs, chunk_abs)
        power = torch.bitwise_and(e.view(torch.int32), 0x7F800000, out=pow_buf[: e.numel()]).view(torch.float32)
        worst_ulp = max(worst_ulp, float(err.div_(power.clamp_(min=max(smallest, floor * scale))).max()) * scale)
    ok = worst_ulp <= max_ulp
    problem = "" if ok else f"off by up to {worst_ulp:.3g} ulp, {worst_abs:.3g} absolute"
    return TensorResult(name, touched, ok, worst_abs, worst_ulp, problem)


def _bit_identical(merged: torch.Tensor, expected: torch.Tensor) -> bool:
    if merged.shape != expected.shape or merged.dtype != expected.dtype:
        return False
    return torch.equal(merged.reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8))


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
    plan: MergePlan, merged: Checkpoint, max_ulp: float = DEFAULT_MAX_ULP, device: str = "cpu"
) -> list[TensorResult]:
    """Compare every tensor of ``merged`` with the plan's recomputation; extra and missing tensors fail."""
    results: list[TensorResult] = []
    planned = {t.name for t in plan.tensors}
    for out in plan.tensors:
        if out.name not in merged:
            results.append(TensorResult(out.name, bool(out.edits), False, problem="missing from the merged model"))
            continue
        info = merged.infos[out.name]
        if tuple(info.shape) != tuple(out.shape):
            problem = f"shape {tuple(info.shape)}, expected {tuple(out.shape)}"
            results.append(TensorResult(out.name, bool(out.edits), False, problem=problem))
            continue
        computed = bool(out.edits) or out.dequant is not None
        if not is_float(info.dtype) or not (is_float(out.dtype) or computed):
            # Integer / fp8 tensors are stored as they are: bit-identical or wrong.
            if info.dtype != out.dtype or not _bit_identical(merged.get(out.name), plan.base.get(out.source)):
                results.append(TensorResult(out.name, False, False, problem="differs from the base (should be copied)"))
            else:
                results.append(TensorResult(out.name, False, True))
            continue
        if not computed:
            # Untouched: the base tensor, cast once to the merged dtype, bit for bit.
            base_info = plan.base.infos[out.source]
            if base_info.dtype == info.dtype and base_info.offset >= 0 and info.offset >= 0:
                same = _same_file_bytes(plan.base, base_info, merged, info)
            else:
                same = _bit_identical(merged.get(out.name), compute_tensor(plan, replace(out, dtype=info.dtype)))
            results.append(
                TensorResult(
                    out.name,
                    False,
                    same,
                    problem="" if same else "untouched by the adapters but not bit-identical to the base",
                )
            )
            continue
        expected = compute_tensor(plan, replace(out, dtype=torch.float32), device)
        results.append(_compare(out.name, merged.get(out.name), expected, max_ulp, bool(out.edits)))
        del expected
    for name in merged.keys():
        if name not in planned:
            results.append(TensorResult(name, False, False, problem="not in base + adapters (unexpected tensor)"))
    return results


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
    base: str | Path | None,
    adapters: Sequence[str | Path],
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
) -> VerifyReport:
    """Verify that ``merged`` is ``base`` with ``adapters`` merged in order with ``weights``.

    ``base`` and ``adapters`` are any sources ``lorafuse.merge`` takes (local paths, Hub or ModelScope ids, git
    URLs; ``cache_dir`` for downloads); ``base=None`` takes the base named in the first adapter's config.
    ``allow_unmatched`` skips adapter tensors the base has no target for, as ``lorafuse merge --allow-unmatched``.
    Returns a :class:`VerifyReport` (``passed`` is the verdict); raises :class:`LorafuseError` on unreadable
    inputs. ``outputs=False`` skips the output-level check.
    """
    started = time.perf_counter()
    if not adapters:
        raise LorafuseError("no adapter given: pass each merged adapter with --adapter, in merge order")
    if not Path(merged).exists():  # before any download
        raise LorafuseError(f"{merged}: no such merged model; pass the folder or file that lorafuse merge wrote")
    sources = resolve_merge_inputs(base, adapters, adapter_format=adapter_format, cache_dir=cache_dir)
    try:
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
        )
    finally:
        sources.cleanup()
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
        base_config = read_json(base_path / "config.json") if base_path.is_dir() else None
        plan = build_plan(base_ckpt, inputs, None, base_config, check_values=False, allow_unmatched=allow_unmatched)
        results = check_weights(plan, merged_ckpt, max_ulp, device)
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
        report.output = check_outputs(
            merged_path, base_path, list(adapters), weight_list, prompts, logit_rtol, min_top1, device, adapter_format
        )
        report.passed = report.passed and report.output.ok
    return report


def render(report: VerifyReport) -> str:
    """A readable summary of a :class:`VerifyReport`."""
    lines = [
        f"merged       {report.merged}",
        f"base         {report.base}",
        "adapters     " + ", ".join(f"{a['path']} (weight {a['weight']:g})" for a in report.adapters),
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
    if report.worst:
        lines.append("worst tensors:")
        lines += [f"  {r.name}: {r.max_ulp:.3g} ulp, {r.max_abs_err:.3g} abs" for r in report.worst]
    for failure in report.failures[:20]:
        lines.append(f"FAIL {failure.name}: {failure.problem}")
    if len(report.failures) > 20:
        lines.append(f"FAIL ... and {len(report.failures) - 20} more")
    lines.append("PASSED" if report.passed else "FAILED")
    return "\n".join(lines)


def _dominant_float_dtype(path: Path) -> torch.dtype:
    """The float dtype holding most of a merged model's parameters (sets the output-level tolerance)."""
    checkpoint = open_output(path)
    try:
        counts: dict[torch.dtype, int] = {}
        for info in checkpoint.infos.values():
            if is_float(info.dtype):
                counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    finally:
        checkpoint.close()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _apply_adapters(
    load_base: Any, adapters: list[Path], weights: list[float], adapter_format: str | None = None
) -> tuple[Any, str]:
    """The base model with the adapters applied on the fly: lorafuse.runtime, else PEFT for PEFT adapters."""
    model = load_base()
    try:
        from .formats import read_adapter
        from .runtime import apply_adapter

        # Read with the live model's names and shapes, which formats such as kohya resolve their names against.
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        for path, weight in zip(adapters, weights):
            adapter = read_adapter(path, label=str(path), fmt=adapter_format, base_shapes=shapes)
            try:
                apply_adapter(model, adapter, weight=weight)
            finally:
                _close_adapter(adapter)
        return model, "runtime LoRA"
    except (ImportError, LorafuseError) as exc:
        peft_folders = all((Path(a) / "adapter_config.json").is_file() for a in adapters)
        if not peft_folders or importlib.util.find_spec("peft") is None:
            raise LorafuseError(str(exc)) from exc
        log.info("runtime LoRA could not apply the adapters (%s); using PEFT", exc)
    return _apply_with_peft(load_base(), adapters, weights), "PEFT"


def _close_adapter(adapter: AdapterInput) -> None:
    for targeted in adapter.edits:
        for ref in targeted.edit.refs():
            ref.checkpoint.close()


def _apply_with_peft(model: Any, adapters: list[Path], weights: list[float]) -> Any:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"lorafuse_{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer):
            for name, weight in zip(names, weights):
                if name in layer.scaling:
                    layer.scaling[name] *= weight
    peft_model.base_model.set_adapter(names)
    return peft_model


def _dequantized_model(model_cls: Any, merged_path: Path, base_path: Path, base_config: Any) -> Any:
    """The base model, dequantized by lorafuse, in the merged model's (unquantized) architecture."""
    model = model_cls.from_pretrained(merged_path, dtype=torch.float32)
    checkpoint, _, _ = open_model(base_path)
    try:
        plan = build_plan(checkpoint, [], None, base_config, check_values=False)
        state = {t.name: compute_tensor(plan, replace(t, dtype=torch.float32)) for t in plan.tensors}
    finally:
        checkpoint.close()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LorafuseError(f"the dequantized base does not fit the merged architecture ({(missing + unexpected)[0]})")
    return model


def _model_inputs(config: Any, merged_path: Path, prompts: Sequence[str] | None) -> dict[str, torch.Tensor]:
    if prompts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(merged_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
    else:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text_config, "vocab_size", None) or getattr(config, "vocab_size", None)
        if not vocab:
            raise LorafuseError("the config names no vocab_size")
        ids = torch.randint(0, int(vocab), (2, 16), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def _forward(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out[0]).float()


def check_outputs(
    merged_path: Path,
    base_path: Path,
    adapters: list[str | Path],
    weights: list[float],
    prompts: Sequence[str] | None = None,
    logit_rtol: float | None = None,
    min_top1: float = DEFAULT_MIN_TOP1,
    device: str = "cpu",
    adapter_format: str | None = None,
) -> OutputCheck:
    """Run the same inputs through MERGED and through BASE + adapters on the fly, both in fp32."""
    try:
        import transformers
    except ImportError:
        return OutputCheck(False, "transformers is not installed")
    config_dict = read_json(merged_path / "config.json") if merged_path.is_dir() else None
    if not config_dict:
        return OutputCheck(False, "the merged model has no config.json")
    arch = (config_dict.get("architectures") or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        return OutputCheck(False, f"architecture {arch!r} is not one transformers provides")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        return _run_outputs(
            model_cls,
            arch,
            merged_path,
            base_path,
            adapters,
            weights,
            prompts,
            device,
            logit_rtol,
            min_top1,
            adapter_format,
        )
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _resize_vocab(model: Any, vocab: Any) -> None:
    """Give the base the merged model's vocabulary size, as training with added tokens did (the adapter holds the
    resized embedding and head whole, so the new rows' initial values do not matter)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(vocab, int) and embeddings is not None and embeddings.weight.shape[0] != vocab:
        model.resize_token_embeddings(vocab)


def _run_outputs(
    model_cls: Any,
    arch: str,
    merged_path: Path,
    base_path: Path,
    adapters: list[str | Path],
    weights: list[float],
    prompts: Sequence[str] | None,
    device: str,
    logit_rtol: float | None,
    min_top1: float,
    adapter_format: str | None,
) -> OutputCheck:
    loaded: list[Any] = []

    base_config = read_json(base_path / "config.json") if base_path.is_dir() else None
    quantized = find_quantization_config(base_config) is not None

    merged_vocab = (read_json(merged_path / "config.json") or {}).get("vocab_size") if merged_path.is_dir() else None

    def load_base() -> Any:  # the first call hands over the model loaded below, later calls reload it
        if loaded:
            return loaded.pop()
        if quantized:  # transformers may not load it here (fp8 on CPU): rebuild it from our dequantization
            return _dequantized_model(model_cls, merged_path, base_path, base_config).to(device).eval()
        model = model_cls.from_pretrained(base_path, dtype=torch.float32)
        _resize_vocab(model, merged_vocab)
        return model.to(device).eval()

    try:
        merged_model = model_cls.from_pretrained(merged_path, dtype=torch.float32).to(device).eval()
        loaded.append(load_base())
    except Exception as exc:  # any loading failure means the check cannot run, not that the merge is wrong
        return OutputCheck(False, f"{arch} did not load with transformers ({_first_line(exc)})")
    try:
        inputs = {k: v.to(device) for k, v in _model_inputs(merged_model.config, merged_path, prompts).items()}
        expected_model, method = _apply_adapters(load_base, [Path(a) for a in adapters], weights, adapter_format)
        expected = _forward(expected_model.eval(), inputs)
        actual = _forward(merged_model, inputs)
    except LorafuseError as exc:
        return OutputCheck(False, f"the adapters could not be applied on the fly ({exc})")
    except Exception as exc:  # a model that does not run on these inputs: report, do not fail the merge
        return OutputCheck(False, f"running {arch} failed ({_first_line(exc)})")
    mask = (
        inputs["attention_mask"].bool()
        if "decoder_input_ids" not in inputs
        else torch.ones(expected.shape[:-1], dtype=torch.bool)
    )
    diff = (actual - expected).abs()[mask]
    rtol = logit_rtol if logit_rtol is not None else DEFAULT_LOGIT_RTOL.get(_dominant_float_dtype(merged_path), 1e-2)
    peak = float(expected[mask].abs().max())
    agreement = float((actual.argmax(-1) == expected.argmax(-1))[mask].float().mean())
    check = OutputCheck(
        ran=True,
        max_logit_diff=float(diff.max()),
        max_logit=peak,
        logit_tolerance=rtol * peak,
        top1_agreement=agreement,
        min_top1=min_top1,
        tokens=int(mask.sum()),
        method=method,
    )
    check.ok = check.max_logit_diff <= check.logit_tolerance and agreement >= min_top1
    return check
