"""Dtype names: safetensors header codes, torch dtypes and the names users type."""

from __future__ import annotations

import torch

from .errors import LorafuseError

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_TO_TORCH["F8_E4M3"] = torch.float8_e4m3fn
    SAFETENSORS_TO_TORCH["F8_E5M2"] = torch.float8_e5m2
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        SAFETENSORS_TO_TORCH[_code] = getattr(torch, _name)

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

USER_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "f32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Map a user dtype name to torch; ``None``/``"auto"`` means keep each tensor's own dtype."""
    if name is None or str(name).lower() == "auto":
        return None
    key = str(name).lower().replace("torch.", "")
    if key not in USER_DTYPES:
        raise LorafuseError(f"unknown dtype {name!r}: use auto, bf16, fp16 or fp32")
    return USER_DTYPES[key]


def dtype_short_name(dtype: torch.dtype) -> str:
    """Short name for reports and config.json (``torch_dtype``)."""
    return str(dtype).replace("torch.", "")


def is_float(dtype: torch.dtype) -> bool:
    """True for dtypes the merge math and dtype conversion apply to (fp8 is stored, not converted)."""
    return dtype in FLOAT_DTYPES


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()
