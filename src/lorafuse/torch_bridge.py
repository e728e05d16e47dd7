"""The optional torch extra: import it with a one-line error naming the extra, and cross arrays both ways.

torch is needed only for pickled checkpoints (``.bin/.pt/.pth``), ``--device cuda``, ``lorafuse.runtime`` and
verify's output-level check; everything else runs on numpy (arrays.py).
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import numpy as np

from . import arrays
from .errors import LorafuseError

TORCH_EXTRA = "pip install 'lorafuse[torch]'"


class MissingExtraError(LorafuseError):
    """A feature needs an optional dependency that is not installed."""


def require_torch(what: str) -> ModuleType:
    """``import torch``, or a one-line error saying that ``what`` needs the torch extra."""
    try:
        import torch
    except ImportError:
        raise MissingExtraError(f"{what} needs PyTorch, which is not installed: {TORCH_EXTRA}") from None
    return torch


def _torch_dtypes(torch: ModuleType) -> dict[np.dtype, Any]:
    table = {
        arrays.F64: torch.float64,
        arrays.F32: torch.float32,
        arrays.F16: torch.float16,
        arrays.BF16: torch.bfloat16,
        arrays.F8_E4M3: getattr(torch, "float8_e4m3fn", None),
        arrays.F8_E5M2: getattr(torch, "float8_e5m2", None),
        np.dtype("<i8"): torch.int64,
        np.dtype("<i4"): torch.int32,
        np.dtype("<i2"): torch.int16,
        np.dtype("i1"): torch.int8,
        np.dtype("u1"): torch.uint8,
        np.dtype("<u2"): getattr(torch, "uint16", None),
        np.dtype("<u4"): getattr(torch, "uint32", None),
        np.dtype("<u8"): getattr(torch, "uint64", None),
        np.dtype("?"): torch.bool,
    }
    return {k: v for k, v in table.items() if v is not None}


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a numpy dtype (``arrays.BF16`` -> ``torch.bfloat16``)."""
    return _torch_dtypes(require_torch("this operation"))[np.dtype(dtype)]


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a torch dtype (``torch.bfloat16`` -> ``arrays.BF16``)."""
    for np_dtype, value in _torch_dtypes(require_torch("this operation")).items():
        if value == dtype:
            return np_dtype
    raise LorafuseError(f"unsupported tensor dtype {dtype}")


def to_torch(array: np.ndarray) -> Any:
    """A torch tensor sharing ``array``'s memory (bf16 and fp8 cross as raw bytes, then take their dtype)."""
    torch = require_torch("this operation")
    wanted = _torch_dtypes(torch)[array.dtype]
    if array.dtype in (arrays.BF16, arrays.F8_E4M3, arrays.F8_E5M2):
        raw = np.ascontiguousarray(array).view(np.uint16 if array.dtype.itemsize == 2 else np.uint8)
        return torch.from_numpy(raw).view(wanted)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: Any) -> np.ndarray:
    """A CPU numpy array with ``tensor``'s values and dtype (bf16 and fp8 through their raw bytes)."""
    torch = require_torch("this operation")
    tensor = tensor.detach().cpu().contiguous()
    dtype = {v: k for k, v in _torch_dtypes(torch).items()}[tensor.dtype]
    if dtype in (arrays.BF16, arrays.F8_E4M3, arrays.F8_E5M2):
        raw = tensor.view(torch.int16 if dtype.itemsize == 2 else torch.uint8).numpy()
        return raw.view(dtype)
    return tensor.numpy()


DEVICE_RE = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device(device: str) -> str:
    """``device`` when lorafuse can run its math there (cpu, cuda, cuda:N on this machine); else one line naming it
    and the choices. Every command that takes ``--device`` comes through here; only a CUDA device imports torch."""
    if not isinstance(device, str) or not DEVICE_RE.fullmatch(device):
        raise LorafuseError(f"--device {device!r} is not a device lorafuse can use: choose cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        torch = require_torch(f"--device {device}")
        if not torch.cuda.is_available():
            raise LorafuseError("--device cuda was asked for but no CUDA device is available: use --device cpu")
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise LorafuseError(
                f"--device {device}: this machine has {count} CUDA device(s): use cuda:0 to cuda:{count - 1}"
            )
    return device
