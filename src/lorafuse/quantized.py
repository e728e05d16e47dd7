"""Quantized base models: detect the quantization, dequantize fp8 block-scaled weights on the fly, refuse the rest.

A merge needs real-valued weights. Where the stored weights are plain tensor math away from them (fp8 e4m3
weights times per-block ``weight_scale_inv`` scales, as in DeepSeek/Qwen FP8 checkpoints) the plan dequantizes
each weight as it streams past and drops the scales and the ``quantization_config``. Packed integer formats
(bitsandbytes, GPTQ, AWQ, ...) are refused before anything is written, with the fix: merge into the original
unquantized model, then quantize the merged model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import BF16, decode_f32
from .errors import LorafuseError

log = logging.getLogger("lorafuse")

SCALE_SUFFIX = "_scale_inv"  # "x.weight" is scaled by "x.weight_scale_inv" (multiplied, despite the name)
# Static activation scales of an fp8 model mean nothing once its weights are dequantized.
ACTIVATION_SCALE_SUFFIXES = (".input_scale", ".activation_scale")
DEFAULT_DEQUANT_DTYPE = BF16
FP8_WEIGHT_CODES = ("F8_E4M3", "F8_E5M2")  # safetensors dtype codes
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


def prepare_base(base: Any, base_config: dict[str, Any] | None) -> BasePreparation:
    """Detect quantization in ``base`` (a Checkpoint) and plan its dequantization, or raise QuantizedBaseError."""
    keys = base.keys()
    info = detect_quantization(base_config, keys)
    if info is None:
        return BasePreparation()
    where = str(Path(_checkpoint_label(base)))
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
