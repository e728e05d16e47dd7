"""``lorafuse verify merged.gguf --base B --adapter A``: a GGUF merge checked tensor by tensor against the plan's
recomputation (the same plan and kernel as verify.py), read back through the GGUF reader (io/gguf_checkpoint.py:
transformers names and row order, dequantized).

What a correct GGUF holds: the merged values rounded once to the plan's dtype (a model folder's, as the
safetensors merge), then stored in the tensor's GGUF type. F32/F16/BF16 tensors must equal that exactly; a
quantized one may be off by no more than quantizing the expected values itself is (its type's own error). A GGUF
base's untouched tensors must be its bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .conv1d import conv1d_modules as parse_conv1d_modules
from .engine.kernel import compute_tensor, copied
from .errors import LorafuseError
from .gguf_quant import quantize
from .io.checkpoint import open_model
from .io.extra_files import read_json
from .io.gguf_checkpoint import HF_EMBEDDING, GGUFCheckpoint, RawTensor
from .names.gguf import DROPPED_SUFFIXES, require_gguf
from .plan import MergePlan, OutputTensor, build_plan
from .sources import resolve_merge_inputs
from .verify import WORST_SHOWN, OutputCheck, TensorResult, VerifyReport, _close_adapter, _load_adapters
from .writers.gguf import shifted

NO_OUTPUT_CHECK = "no output-level check for a GGUF (it needs llama.cpp to run the model)"
EXACT_TYPES = ("F32", "F16", "BF16")


def verify_gguf(
    merged: str | Path,
    base: str | Path | None,
    adapters: Sequence[str | Path] | None,
    weights: Sequence[float] | None = None,
    adapter_format: str | None = None,
    cache_dir: str | Path | None = None,
    allow_unmatched: bool = False,
    conv1d_modules: str | Sequence[str] | None = None,
) -> VerifyReport:
    """Verify GGUF ``merged`` is ``base`` (a model folder or a GGUF) with ``adapters`` merged (with ``weights``)."""
    started = time.perf_counter()
    if not adapters:
        raise LorafuseError(
            f"{merged}: a GGUF records its adapters' hashes, not where they are: pass --base and --adapter"
        )
    sources = resolve_merge_inputs(base, adapters, adapter_format=adapter_format, cache_dir=cache_dir)
    weight_list = list(weights) if weights is not None else [1.0] * len(sources.adapters)
    merged_ckpt = GGUFCheckpoint(Path(merged))
    base_ckpt, _, _ = open_model(sources.base)
    inputs = []
    try:
        inputs = _load_adapters(sources.adapters, weight_list, adapter_format, base_ckpt)
        folder = sources.base if sources.base.is_dir() else None
        config = read_json(folder / "config.json") if folder else getattr(base_ckpt, "config", None)
        plan = build_plan(
            base_ckpt,
            inputs,
            None,
            config,
            check_values=False,
            allow_unmatched=allow_unmatched,
            conv1d_modules=parse_conv1d_modules(conv1d_modules),
        )
        results = [
            _check(plan, merged_ckpt, out)
            if out.name in merged_ckpt
            else TensorResult(out.name, bool(out.edits), False, problem="missing from the merged GGUF")
            for out in plan.tensors
            # buffers llama.cpp's converter leaves out, and tensors its architecture has not (Gemma2's lm_head)
            if not out.name.endswith(DROPPED_SUFFIXES) and out.name not in merged_ckpt.spec.dropped
        ]
        generated = _generated_tensors(folder) if folder is not None else {}
        results += [_check_generated(merged_ckpt, name, values) for name, values in generated.items()]
        planned = {out.name for out in plan.tensors} | set(generated)
        results += [
            TensorResult(name, False, False, problem="not in base + adapters (unexpected tensor)")
            for name in merged_ckpt.keys()
            if name not in planned
        ]
        warnings = list(plan.warnings)
        quantized = sorted({merged_ckpt.raw(r.name).qtype.name for r in results if r.touched and r.name in merged_ckpt})
        quantized = [name for name in quantized if name not in EXACT_TYPES]
        if quantized:
            warnings.append(
                f"changed {'/'.join(quantized)} tensors are checked against their type's own rounding (the error of "
                "quantizing the recomputed values), not in ulp; F32/F16/BF16 ones must be exact"
            )
    finally:
        merged_ckpt.close()
        base_ckpt.close()
        for inp in inputs:
            _close_adapter(inp)
        sources.cleanup()
    touched = [r for r in results if r.touched]
    failures = [r for r in results if not r.ok]
    return VerifyReport(
        merged=str(merged),
        base=str(sources.base),
        adapters=[{"path": str(a), "weight": float(w)} for a, w in zip(sources.adapters, weight_list)],
        passed=not failures,
        tensors_checked=len(results),
        tensors_touched=len(touched),
        max_abs_err=max((r.max_abs_err for r in touched), default=0.0),
        max_ulp=0.0,  # exact types must be exact; quantized ones are bounded by their own rounding (the note)
        max_ulp_allowed=0.0,
        failures=failures,
        worst=sorted(touched, key=lambda r: -r.max_abs_err)[:WORST_SHOWN],
        output=OutputCheck(False, NO_OUTPUT_CHECK),
        warnings=warnings,
        seconds=time.perf_counter() - started,
    )


def _generated_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The tensors llama.cpp's converter makes from model ``folder``'s config (llama3 rope_freqs, ...)."""
    from .gguf_header import generated_tensors, load_hparams
    from .names.gguf import gguf_arch_of

    params = load_hparams(folder)
    return dict(generated_tensors(gguf_arch_of(params, str(folder / "config.json")), params, folder))


def _check_generated(merged: GGUFCheckpoint, name: str, values: np.ndarray) -> TensorResult:
    if name not in merged:
        return TensorResult(name, False, False, problem="missing from the merged GGUF (the converter writes it)")
    same = bool(np.array_equal(merged.array(name).reshape(-1), values.reshape(-1)))
    return TensorResult(name, False, same, problem="" if same else "not the values the config gives")


def _same_bytes(base: GGUFCheckpoint, merged: GGUFCheckpoint, a: RawTensor, b: RawTensor) -> bool:
    """Whether tensor ``a`` of ``base`` and ``b`` of ``merged`` are stored alike, byte for byte."""
    if (a.qtype, a.nbytes) != (b.qtype, b.nbytes):
        return False
    fa, fb = base.fd(base.files[0]), merged.fd(merged.files[0])
    step = 16 << 20
    for at in range(0, a.nbytes, step):
        size = min(step, a.nbytes - at)  # the next tensor's bytes follow: they differ in position
        if os.pread(fa, size, a.offset + at) != os.pread(fb, size, b.offset + at):
            return False
    return True


def _check(plan: MergePlan, merged: GGUFCheckpoint, out: OutputTensor) -> TensorResult:
    raw = merged.raw(out.name)
    touched = bool(out.edits)
    cut = merged.spec.real_vocab and out.name == HF_EMBEDDING and raw.shape[1:] == tuple(out.shape[1:])
    if tuple(raw.shape) != tuple(out.shape) and not (cut and raw.shape[0] <= out.shape[0]):
        return TensorResult(out.name, touched, False, problem=f"shape {raw.shape}, expected {tuple(out.shape)}")
    if isinstance(plan.base, GGUFCheckpoint) and copied(out, plan):
        same = _same_bytes(plan.base, merged, plan.base.raw(out.source), raw)
        return TensorResult(out.name, False, same, problem="" if same else "not the GGUF base's bytes")
    gguf = require_gguf()
    computed = np.asarray(compute_tensor(plan, out))
    # Gemma's norms: compared as stored, shifted as the writer shifts them
    if cut:  # Gemma3's embedding: the converter keeps the tokenizer's rows only
        computed = computed[: raw.shape[0]]
    values = shifted(computed, raw.shift).reshape(-1, raw.shape[-1] if raw.shape else 1)
    if not np.isfinite(values).all():
        return TensorResult(out.name, touched, False, problem="the recomputed tensor holds NaN or Inf")
    want = gguf.quants.dequantize(quantize(values, raw.qtype), raw.qtype).reshape(-1)
    got = merged.array(out.name, stored=True).reshape(-1)
    values = values.reshape(-1)
    error = float(np.abs(got - values).max()) if values.size else 0.0
    if raw.qtype.name in EXACT_TYPES:
        ok = bool(np.array_equal(got, want))
        problem = "" if ok else f"not the merged values in {raw.qtype.name} (off by up to {error:.3g})"
    else:
        own = float(np.abs(want - values).max()) if values.size else 0.0
        ok = error <= own * (1 + 1e-6) + 1e-7 * float(np.abs(values).max(initial=0.0))
        problem = "" if ok else f"off by up to {error:.3g}, more than {raw.qtype.name} rounding ({own:.3g})"
    return TensorResult(out.name, touched, ok, error, 0.0, problem)
