"""Quantized base models: detect the quantization, dequantize fp8 block-scaled weights on the fly, refuse the rest.

A merge needs real-valued weights. Where the stored weights are plain tensor math away from them (fp8 e4m3
weights times per-block ``weight_scale_inv`` scales, as in DeepSeek/Qwen FP8 checkpoints) the plan dequantizes
each weight as it streams past and drops the scales and the ``quantization_config``. Packed integer formats
(bitsandbytes, GPTQ, AWQ, ...) are refused before anything is written, with the fix: merge into the original
unquantized model, then quantize the merged model.

fp8 diffusion checkpoints (ComfyUI's, Flux/Wan fp8 files) carry no quantization_config: every fp8 tensor is
either a plain fp8 cast (unscaled) or, in ComfyUI's scaled fp8, a weight whose real values are its fp8 values
times the fp32 scalar ``<layer>.scale_weight`` beside it (``scaled_fp8``, a marker tensor whose dtype names the
fp8 type; ``<layer>.scale_input`` for fp8 matmuls). They merge by :class:`Fp8Base`: written back in fp8 (``--dtype``
auto, or an fp8 type), a merged weight's scale is recomputed from its merged values (absolute maximum over the
fp8 range, ComfyUI's per-tensor rule) and its values divided by it and rounded once; with ``--dtype``
bf16/fp16/fp32 every fp8 tensor is dequantized and the scales and marker are dropped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import BF16, F8_E4M3, F8_E5M2, F32, decode_f32, parse_dtype
from .errors import LorafuseError

log = logging.getLogger("lorafuse")

SCALE_SUFFIX = "_scale_inv"  # "x.weight" is scaled by "x.weight_scale_inv" (multiplied, despite the name)
# Static activation scales of an fp8 model mean nothing once its weights are dequantized.
ACTIVATION_SCALE_SUFFIXES = (".input_scale", ".activation_scale")
DEFAULT_DEQUANT_DTYPE = BF16
FP8_WEIGHT_CODES = ("F8_E4M3", "F8_E5M2")  # safetensors dtype codes
FP8_DTYPES = (F8_E4M3, F8_E5M2)
# --dtype names of the fp8 types (merges into fp8 bases only).
FP8_NAMES = {
    "fp8_e4m3fn": F8_E4M3,
    "float8_e4m3fn": F8_E4M3,
    "e4m3fn": F8_E4M3,
    "fp8_e5m2": F8_E5M2,
    "float8_e5m2": F8_E5M2,
    "e5m2": F8_E5M2,
}
FP8_MAX = {F8_E4M3: 448.0, F8_E5M2: 57344.0}  # largest finite value of each
# ComfyUI's scaled fp8 (comfy/ops.py scaled_fp8_ops; model_detection pops the marker and reads its dtype).
COMFY_WEIGHT_SCALE = ".scale_weight"
COMFY_INPUT_SCALE = ".scale_input"
COMFY_MARKER = "scaled_fp8"
SCALE_CODES = ("F32", "BF16", "F16")

# Tensor-name hints for checkpoints whose config.json does not (or no longer) say how they are quantized.
TENSOR_HINTS = (
    (".qweight", "gptq/awq"),
    (".qzeros", "gptq/awq"),
    (".g_idx", "gptq"),
    (".absmax", "bitsandbytes 4-bit"),
    (".quant_map", "bitsandbytes 4-bit"),
    (".quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit"),
    (".quant_state.bitsandbytes__fp4", "bitsandbytes 4-bit"),
    (".SCB", "bitsandbytes 8-bit"),
    (".weight_packed", "compressed-tensors"),
)
ORIGINAL_MODEL_KEYS = ("original_model", "original_model_name_or_path", "base_model", "model_name_or_path")


class QuantizedBaseError(LorafuseError):
    """The base model is quantized in a way lorafuse cannot merge into."""


@dataclass
class QuantizationInfo:
    """How a model is quantized, and whether lorafuse can dequantize it on the fly."""

    method: str
    description: str
    config: dict[str, Any] | None
    dequantizable: bool
    reason: str = ""
    original_model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "description": self.description,
            "dequantizable": self.dequantizable,
            "reason": self.reason,
            "original_model": self.original_model,
            "config": self.config,
        }


def find_quantization_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``quantization_config`` of a config.json, top level or in a nested model config (e.g. ``text_config``)."""
    if not config:
        return None
    for candidate in (config, *(v for v in config.values() if isinstance(v, dict))):
        quant = candidate.get("quantization_config")
        if isinstance(quant, dict) and quant:
            return quant
    # Older GPTQ/AWQ exports keep a "quantization_config"-less "quantization" block.
    return None


def _describe(quant: dict[str, Any]) -> tuple[str, str]:
    method = str(quant.get("quant_method", "")).lower() or "unknown"
    if quant.get("load_in_4bit") or quant.get("_load_in_4bit"):
        return "bitsandbytes", f"bitsandbytes 4-bit ({quant.get('bnb_4bit_quant_type', 'fp4')})"
    if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
        return "bitsandbytes", "bitsandbytes 8-bit"
    if method == "fp8":
        block = quant.get("weight_block_size")
        blocks = f"blocks {block[0]}x{block[1]}" if block else "per-tensor scales"
        return "fp8", f"fp8 ({quant.get('fmt', 'e4m3')}, {blocks})"
    bits = quant.get("bits") or quant.get("w_bit")
    return method, f"{method} {bits}-bit" if bits else method


def original_model_hint(config: dict[str, Any] | None) -> str | None:
    """The unquantized model a quantized config names, when it names one."""
    if not config:
        return None
    quant = find_quantization_config(config) or {}
    for source in (quant, config):
        for key in ORIGINAL_MODEL_KEYS:
            if isinstance(source.get(key), str) and source[key]:
                return source[key]
    name = config.get("_name_or_path")
    return name if isinstance(name, str) and name else None


def detect_quantization(config: dict[str, Any] | None, keys: list[str]) -> QuantizationInfo | None:
    """How the model with ``config`` and tensor names ``keys`` is quantized, or None when it is not."""
    quant = find_quantization_config(config)
    hint = original_model_hint(config)
    if quant is not None:
        method, description = _describe(quant)
        if method == "fp8":
            if str(quant.get("expert_dtype", "fp8")) != "fp8":
                return QuantizationInfo(method, description, quant, False, "fp4-packed experts", hint)
            if str(quant.get("scale_fmt", "float")) != "float":
                return QuantizationInfo(method, description, quant, False, "ue8m0 block scales", hint)
            return QuantizationInfo(method, description, quant, True, original_model=hint)
        return QuantizationInfo(method, description, quant, False, "packed integer weights", hint)
    for suffix, name in TENSOR_HINTS:
        if any(k.endswith(suffix) for k in keys):
            return QuantizationInfo(name, f"{name} (from tensor names)", None, False, "packed integer weights", hint)
    if any(k.endswith(SCALE_SUFFIX) for k in keys):
        return QuantizationInfo("fp8", "fp8 (from weight_scale_inv tensors)", None, True, original_model=hint)
    return None


def refusal_message(info: QuantizationInfo, where: str) -> str:
    """One line: what is quantized, why lorafuse will not merge into it, and the fix."""
    original = f" ({info.original_model}, as its config says)" if info.original_model else ""
    return (
        f"base model {where} is quantized ({info.description}{'; ' + info.reason if info.reason else ''}), "
        f"which lorafuse cannot merge into exactly: merge the (Q)LoRA adapter into the original unquantized "
        f"model{original}, then quantize the merged model"
    )


@dataclass
class Fp8Dequant:
    """fp8 weight -> fp32: each (rows x cols) block of the weight times its scale from the tensor ``scale``.

    Applied to a block of the weight's rows at a time (the kernel's row blocks): a 2-D weight's rows take their
    row of scales; a stacked weight (experts, rows, cols) is split by its first dimension, whole matrices.
    """

    scale: str
    block: tuple[int, int] | None  # None: one scale for the whole tensor

    def apply(self, base: Any, values: np.ndarray, start: int, stop: int, shape: tuple[int, ...]) -> None:
        """Scale ``values`` in place: the fp32 rows ``start:stop`` (first dimension) of the weight of ``shape``,
        viewed as 2-D."""
        scale = decode_f32(base.array(self.scale), base.infos[self.scale].dtype)
        if self.block is None:
            values *= scale.reshape(())
            return
        block_rows, block_cols = self.block
        cols = shape[-1]
        if len(shape) == 2:
            weight, scale, first = values.reshape(stop - start, cols), scale, start
        else:  # whole matrices of a stacked weight: their own scales
            weight, scale, first = values.reshape(stop - start, *shape[1:]), scale[start:stop], 0
        # Row block by row block: expand scales over columns only, never a weight-sized scale tensor.
        rows_here = weight.shape[-2]
        for i in range(first // block_rows, -(-(first + rows_here) // block_rows)):
            low, high = max(first, i * block_rows) - first, min(first + rows_here, (i + 1) * block_rows) - first
            weight[..., low:high, :] *= np.repeat(scale[..., i : i + 1, :], block_cols, axis=-1)[..., :cols]


def _block_error(name: str, shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int]) -> str | None:
    if len(shape) < 2 or len(scale_shape) != len(shape):
        return f"{name} has shape {shape} and its scales {scale_shape}"
    expected = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    if tuple(scale_shape) != expected:
        return f"{name} {shape} with blocks {block[0]}x{block[1]} needs scales {expected}, found {scale_shape}"
    return None


@dataclass
class BasePreparation:
    """What the plan does to a quantized base: dequantize some tensors, drop others, edit config.json."""

    info: QuantizationInfo | None = None
    dequant: dict[str, Fp8Dequant] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    config_updates: dict[str, Any] = field(default_factory=dict)
    fp8: Fp8Base | None = None  # an fp8 checkpoint without quantization_config (ComfyUI's, plain fp8 casts)

    def mergeable(self, source: str) -> bool:
        """Whether adapters may change the non-float base tensor ``source`` (an fp8 weight lorafuse decodes)."""
        return source in self.dequant or (self.fp8 is not None and source in self.fp8.fp8 and not _is_marker(source))

    def bind(self, touched: set[str]) -> None:
        """Tell the preparation which base tensors the adapters change (an fp8 weight then gets a new scale)."""
        if self.fp8 is not None:
            self.fp8.bind(touched)

    def fp8_output(self, source: str) -> tuple[np.dtype, Any, Fp8Encode | None] | None:
        """(dtype, dequant hook, encode hook) of an fp8 checkpoint's tensor ``source``; None for the plan's rule."""
        return self.fp8.output(source) if self.fp8 is not None else None

    def output_dtype(self, source: str, requested: np.dtype | None) -> np.dtype | None:
        """The output dtype of a dequantized tensor (requested, else bf16); None for other tensors."""
        if source not in self.dequant:
            return None
        return requested or DEFAULT_DEQUANT_DTYPE


def _checkpoint_label(base: Any) -> str:
    files = getattr(base, "files", None) or []
    if not files:
        return "<base>"
    first = Path(files[0])
    return str(first.parent if len(files) > 1 or first.suffix != ".safetensors" else first)


def prepare_base(base: Any, base_config: dict[str, Any] | None, dtype: np.dtype | None = None) -> BasePreparation:
    """Detect quantization in ``base`` (a Checkpoint) and plan its dequantization, or raise QuantizedBaseError.

    ``dtype``: the requested output dtype (None: auto); an fp8 type only for fp8 checkpoints without
    quantization_config (:class:`Fp8Base`)."""
    keys = base.keys()
    info = detect_quantization(base_config, keys)
    if info is None:
        fp8 = fp8_base(base, dtype)
        return BasePreparation(fp8=fp8, dropped=fp8.dropped(keys) if fp8 is not None else set())
    where = str(Path(_checkpoint_label(base)))
    if dtype in FP8_DTYPES:
        raise QuantizedBaseError(
            f"--dtype {np.dtype(dtype).name} writes fp8 checkpoints without a quantization_config back in fp8; "
            f"{where} is {info.description}: merge with --dtype auto or bf16"
        )
    if not info.dequantizable:
        raise QuantizedBaseError(refusal_message(info, where))
    block_cfg = (info.config or {}).get("weight_block_size", [128, 128] if info.config is None else None)
    block = (int(block_cfg[0]), int(block_cfg[1])) if block_cfg else None
    prep = BasePreparation(info=info)
    for key in keys:
        if key.endswith(ACTIVATION_SCALE_SUFFIXES):
            prep.dropped.add(key)
            continue
        if not key.endswith(SCALE_SUFFIX):
            continue
        weight_key = key[: -len(SCALE_SUFFIX)]
        if weight_key not in base.infos:
            raise QuantizedBaseError(
                f"{where}: scale tensor {key!r} has no weight {weight_key!r}; the checkpoint is incomplete"
            )
        w_info, s_info = base.infos[weight_key], base.infos[key]
        if w_info.code not in FP8_WEIGHT_CODES or s_info.code not in SCALE_CODES:
            info.reason = f"{weight_key} is {w_info.dtype} with {s_info.dtype} scales"
            raise QuantizedBaseError(refusal_message(info, where))
        per_tensor = math.prod(s_info.shape) == 1
        if not per_tensor:
            err = _block_error(weight_key, w_info.shape, s_info.shape, block) if block else "no weight_block_size"
            if err:
                raise QuantizedBaseError(
                    f"{where}: fp8 scales do not match the weights ({err}); the checkpoint or its config is broken"
                )
        prep.dequant[weight_key] = Fp8Dequant(key, None if per_tensor else block)
        prep.dropped.add(key)
    stray = [k for k in keys if base.infos[k].code in FP8_WEIGHT_CODES and k not in prep.dequant]
    if stray:
        info.reason = f"fp8 tensor {stray[0]!r} has no {SCALE_SUFFIX} scales"
        raise QuantizedBaseError(refusal_message(info, where))
    if info.config is not None:
        prep.config_updates["quantization_config"] = None  # removed from config.json
    log.info("dequantizing %d fp8 tensors of %s on the fly", len(prep.dequant), where)
    return prep


def parse_merge_dtype(name: str | None) -> np.dtype | None:
    """``merge --dtype``: what :func:`~lorafuse.arrays.parse_dtype` takes, plus the fp8 types (fp8_e4m3fn,
    fp8_e5m2), which only an fp8 base may be written in (:class:`Fp8Base`)."""
    key = str(name).lower().replace("torch.", "") if name is not None else None
    if key in FP8_NAMES:
        return FP8_NAMES[key]
    try:
        return parse_dtype(name)
    except LorafuseError:
        raise LorafuseError(f"unknown dtype {name!r}: use auto, bf16, fp16, fp32, fp8_e4m3fn or fp8_e5m2") from None


def _is_marker(key: str) -> bool:
    return key == COMFY_MARKER or key.endswith("." + COMFY_MARKER)


@dataclass
class Fp8Encode:
    """fp32 merged values -> the values stored in fp8: divided by the weight's new scale (ComfyUI scaled fp8; set
    by :func:`measure_fp8_scales` before writing) and kept in range; unscaled, as they are (the range is checked
    when rounding: arrays.check_values)."""

    dtype: np.dtype
    scale_key: str | None  # the ``scale_weight`` tensor whose value is recomputed; None: unscaled fp8
    scale: float | None = None

    def apply(self, values: np.ndarray) -> None:
        if self.scale_key is None:
            return
        if self.scale is None:
            raise LorafuseError(f"the fp8 scale {self.scale_key!r} was not measured before writing")
        values /= np.float32(self.scale)
        limit = FP8_MAX[np.dtype(self.dtype)]
        np.clip(values, -limit, limit, out=values)  # amax / scale may round a hair past the range


@dataclass
class NewScale:
    """The ``scale_weight`` of a re-encoded weight: every value set to the scale measured for it."""

    encode: Fp8Encode

    def apply(self, base: Any, values: np.ndarray, start: int, stop: int, shape: tuple[int, ...]) -> None:
        del base, start, stop, shape
        if self.encode.scale is None:
            raise LorafuseError(f"the fp8 scale {self.encode.scale_key!r} was not measured before writing")
        values[...] = np.float32(self.encode.scale)


@dataclass
class Fp8Base:
    """How an fp8 base without quantization_config merges (module docstring): ``scales`` maps each scaled fp8
    weight to its ``scale_weight``; ``requested`` is ``--dtype`` (None: auto)."""

    where: str
    scales: dict[str, str]
    fp8: dict[str, np.dtype]  # every fp8 tensor (weights and markers) -> its stored fp8 type
    requested: np.dtype | None
    infos: dict[str, Any] = field(repr=False, default_factory=dict)  # the base's tensor infos
    touched: set[str] = field(default_factory=set)
    encodes: dict[str, Fp8Encode] = field(default_factory=dict)

    @property
    def dequantized(self) -> bool:
        """True when the output is a float type: fp8 tensors dequantized, scales and markers dropped."""
        return self.requested is not None and self.requested not in FP8_DTYPES

    def dropped(self, keys: list[str]) -> set[str]:
        if not self.dequantized:
            return set()
        by_scale = set(self.scales.values())
        input_scales = {w.removesuffix(".weight") + COMFY_INPUT_SCALE for w in self.scales}
        return {k for k in keys if k in by_scale or k in input_scales or _is_marker(k)}

    def bind(self, touched: set[str]) -> None:
        """Decide each fp8 tensor's encoding, once the plan knows which tensors the adapters change."""
        self.touched = set(touched)
        for key in self.fp8:
            if _is_marker(key) or self.dequantized:
                continue
            target = self.requested or self.fp8[key]
            if key in self.touched or target != self.fp8[key]:
                self.encodes[key] = Fp8Encode(target, self.scales.get(key))

    def output(self, source: str) -> tuple[np.dtype, Any, Fp8Encode | None] | None:
        """(dtype, dequant hook, encode hook) of output tensor ``source``; None where the plan's own rule holds."""
        info = self.infos[source]
        scale = self.scales.get(source)
        dequant = Fp8Dequant(scale, None) if scale is not None else None
        if source in self.fp8 and self.dequantized:
            return self.requested, dequant, None
        if source in self.encodes:
            return self.encodes[source].dtype, dequant, self.encodes[source]
        rescaled = next((e for w, e in self.encodes.items() if self.scales.get(w) == source), None)
        if rescaled is not None:
            return info.dtype, NewScale(rescaled), None
        if _is_marker(source) and self.requested in FP8_DTYPES:
            return self.requested, None, None
        if source in self.fp8 or source in self.scales.values() or source.endswith(COMFY_INPUT_SCALE):
            return info.dtype, None, None  # an fp8 tensor, scale or marker kept as stored
        if self.requested in FP8_DTYPES:
            return info.dtype, None, None  # --dtype fp8 re-encodes the fp8 tensors only; the rest keep their dtype
        return None


def fp8_base(base: Any, requested: np.dtype | None) -> Fp8Base | None:
    """The :class:`Fp8Base` of a checkpoint that holds fp8 tensors and no quantization_config; None when it holds
    none (``--dtype`` naming an fp8 type is then refused: which tensors to quantize is not lorafuse's choice)."""
    infos = base.infos
    fp8 = {k for k, info in infos.items() if info.code in FP8_WEIGHT_CODES}
    where = _checkpoint_label(base)
    if not fp8:
        if requested in FP8_DTYPES:
            raise QuantizedBaseError(
                f"--dtype {np.dtype(requested).name} writes an fp8 base back in fp8; {where} holds no fp8 tensor, and "
                "which of its tensors to quantize is not lorafuse's choice: merge in bf16, then quantize"
            )
        return None
    scales: dict[str, str] = {}
    for key, info in infos.items():
        if not key.endswith(COMFY_WEIGHT_SCALE):
            continue
        weight = key[: -len(COMFY_WEIGHT_SCALE)] + ".weight"
        if weight not in infos:
            raise QuantizedBaseError(f"{where}: scale {key!r} has no weight {weight!r}; the checkpoint is incomplete")
        if weight not in fp8 or info.code != "F32" or math.prod(info.shape) != 1:
            raise QuantizedBaseError(
                f"{where}: {key!r} ({info.code} {list(info.shape)}) scales {weight!r} ({infos[weight].code}); "
                "ComfyUI's scaled fp8 holds one F32 scale per fp8 weight: not a checkpoint lorafuse can merge into"
            )
        scales[weight] = key
    marked = any(_is_marker(k) for k in infos)
    if marked and not scales:
        raise QuantizedBaseError(f"{where}: a {COMFY_MARKER} marker but no {COMFY_WEIGHT_SCALE} tensors: damaged")
    if scales:
        log.info("%s: ComfyUI scaled fp8 (%d scaled weights)", where, len(scales))
    return Fp8Base(where, scales, {k: infos[k].dtype for k in fp8}, requested, infos)


def measure_fp8_scales(plan: Any) -> None:
    """Set the new scale of every re-encoded scaled fp8 weight of ``plan``: the absolute maximum of its merged
    fp32 values over the fp8 type's largest value (1 for a weight of zeros), computed by the numpy kernel before
    the weight is written (one more pass over the merged weights only)."""
    from dataclasses import replace

    from .engine.kernel import RowMerger

    pending = [t for t in plan.tensors if getattr(t, "encode", None) is not None and t.encode.scale_key is not None]
    if not pending:
        return
    merger = RowMerger(plan)
    for out in pending:
        amax = [0.0]

        def emit(at: int, data: memoryview, amax: list[float] = amax) -> None:
            values = np.frombuffer(data, dtype=F32)
            if values.size:
                amax[0] = max(amax[0], float(np.abs(values).max()))

        merger.merge(replace(out, dtype=F32, encode=None), emit)
        scale = np.float32(amax[0] / FP8_MAX[np.dtype(out.encode.dtype)]) if amax[0] > 0 else np.float32(1.0)
        out.encode.scale = float(scale)
