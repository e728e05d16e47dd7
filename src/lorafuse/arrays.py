"""Tensors as numpy arrays: safetensors dtype codes, the dtype names users type, fp32 decoding and one rounding.

The merge math runs in fp32 on numpy; ml_dtypes gives numpy the bf16 and fp8 types safetensors stores. Decoding
and rounding are written so that every path (merge, extract, verify, combine) rounds the same way as torch does:
to nearest, ties to even, once.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from .errors import DtypeOverflowError, LorafuseError, NonFiniteError
from .fastcast import FAST, bits16, contiguous

F64 = np.dtype("<f8")
F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
BF16 = np.dtype(ml_dtypes.bfloat16)
F8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
F8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)
# Pairs of fp32 / fp16 values as one complex element: ml_dtypes' complex64 -> complex32 cast rounds each half to
# nearest even in 0.7 ns per value, where numpy's fp32 -> fp16 cast takes 1.8 ns (scalar C in numpy's build).
C64 = np.dtype(np.complex64)
C32 = np.dtype(ml_dtypes.complex32)

CODE_TO_DTYPE: dict[str, np.dtype] = {
    "F64": F64,
    "F32": F32,
    "F16": F16,
    "BF16": BF16,
    "F8_E4M3": F8_E4M3,
    "F8_E5M2": F8_E5M2,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPE_TO_CODE: dict[np.dtype, str] = {v: k for k, v in CODE_TO_DTYPE.items()}

USER_DTYPES: dict[str, np.dtype] = {
    "fp32": F32,
    "float32": F32,
    "f32": F32,
    "fp16": F16,
    "float16": F16,
    "half": F16,
    "f16": F16,
    "bf16": BF16,
    "bfloat16": BF16,
}
# Dtypes that the merge math reads and writes (fp8 is a stored format: dequantized, see quantized.py).
MATH_DTYPES = (F64, F32, F16, BF16)
NORM_ROW = 128  # elements per fp32 partial sum of squares (squared_norm)
# Largest finite value per rounded output dtype (fp32 and fp64 only need the NaN/Inf check).
FINITE_LIMIT = {
    F16: 65504.0,
    BF16: float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
    F8_E4M3: float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max),  # fp8 bases written in fp8 (quantized.py)
    F8_E5M2: float(ml_dtypes.finfo(ml_dtypes.float8_e5m2).max),
}
# fp16 and bf16 round a value to Inf from half an ulp above their largest finite one (that tie goes to even, Inf);
# below, it rounds to a finite value and passes, as in the compiled roundings' check of their output.
ROUNDS_TO_INF = {F16: 65520.0, BF16: FINITE_LIMIT[BF16] + 2.0**119}


def dtype_of(code: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype code (``"BF16"``...)."""
    try:
        return CODE_TO_DTYPE[code]
    except KeyError:
        raise LorafuseError(f"unsupported tensor dtype {code!r}") from None


def code_of(dtype: np.dtype) -> str:
    """The safetensors dtype code of a numpy dtype."""
    return DTYPE_TO_CODE[np.dtype(dtype)]


def parse_dtype(name: str | None) -> np.dtype | None:
    """A user's dtype name (``bf16``, ``fp16``, ``fp32``...); ``None``/``"auto"`` keeps each tensor's own dtype."""
    if name is None or str(name).lower() == "auto":
        return None
    key = str(name).lower().replace("torch.", "")
    if key not in USER_DTYPES:
        raise LorafuseError(f"unknown dtype {name!r}: use auto, bf16, fp16 or fp32")
    return USER_DTYPES[key]


def short_name(dtype: np.dtype) -> str:
    """The dtype's name in reports and config.json (``bfloat16``, ``float16``: the names torch uses too)."""
    return np.dtype(dtype).name


def is_float(dtype: np.dtype) -> bool:
    """True for the dtypes the merge math and dtype conversion apply to."""
    return np.dtype(dtype) in MATH_DTYPES


def nbytes_of(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``."""
    return math.prod(shape) * np.dtype(dtype).itemsize


def decode_f32(raw: np.ndarray, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Little-endian tensor bytes (uint8, or already viewed as ``dtype``) as fp32 values, into ``out`` if given.

    bf16 is the top half of an fp32, so it decodes with a shift (3x faster than a cast); fp16 with the compiled
    conversion (fastcast.py) where built, else on its bits too (:func:`_decode_f16`).
    """
    dtype = np.dtype(dtype)
    values = raw.view(dtype) if raw.dtype != dtype else raw
    if out is None:
        out = np.empty(values.shape, dtype=F32)
    if dtype == BF16:
        np.left_shift(values.view("<u2"), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif dtype == F16 and _compiled(values, out, F32):
        FAST.f16_to_f32(bits16(values), out)
    elif dtype == F16 and _bit_decodable(values, out):
        _decode_f16(values, out)
    else:
        np.copyto(out, values, casting="unsafe")
    return out


# fp16 bits shifted into an fp32's place read as the value times 2**-112 (an fp32 subnormal for an fp16 subnormal).
F16_RESCALE = np.float32(2.0**112)
F16_SIGN_AND_BITS = np.int32(-0x70000001)  # 0x8FFFFFFF: the sign, and no sign-extension bits over the exponent
_SUBNORMAL_PROBE = np.array([2.0**-149], dtype=F32)


def _bit_decodable(values: np.ndarray, out: np.ndarray) -> bool:
    """True when :func:`_decode_f16` applies: contiguous fp16 values into a contiguous fp32 ``out`` of their shape,
    on a thread that keeps subnormals."""
    contiguous = values.flags.c_contiguous and out.flags.c_contiguous
    return bool(values.size) and contiguous and out.dtype == F32 and out.shape == values.shape and _keeps_subnormals()


def _keeps_subnormals() -> bool:
    """False where this thread's FP environment reads subnormals as zero (DAZ, e.g. torch.set_flush_denormal),
    which the fp16 bit decode relies on."""
    return bool(np.multiply(_SUBNORMAL_PROBE, F16_RESCALE)[0] != 0)


def _decode_f16(values: np.ndarray, out: np.ndarray) -> None:
    """fp16 ``values`` as fp32 into ``out``, bit for bit numpy's cast: the sign-extended bits shifted into place
    (the exponent rebased by 112, so the bits hold the value times 2**-112), then one exact multiply by 2**112.
    Three numpy passes: 0.45-0.8 ns per element on a 1 MB block against 0.85-1.5 ns for the cast (scalar C here);
    Inf and NaN (rare, never in a tensor the merge changes) take the cast."""
    bits = out.view(np.int32)
    np.left_shift(values.view("<i2"), 13, out=bits, dtype=np.int32)
    np.bitwise_and(bits, F16_SIGN_AND_BITS, out=bits)
    np.multiply(out, F16_RESCALE, out=out)
    unsigned = values.view("<u2")
    if int(unsigned.max()) >= 0xFC00 or int(unsigned.view("<i2").max()) >= 0x7C00:  # an Inf or NaN among them
        np.copyto(out, values, casting="unsafe")


def round_to(values: np.ndarray, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
    """fp32 ``values`` rounded once to ``dtype`` (to nearest, ties to even), into ``out`` (of ``dtype``) if given.

    numpy's and ml_dtypes' casts round to nearest even, bit for bit as torch does (tests/test_arrays.py). For bf16
    the cast is one pass and no temporary: 0.8 ms per 4 MB fp32 block against 1.7 ms for rounding on the bits
    (add 0x7FFF plus the lowest kept bit, keep the top half) in five numpy passes; fp16 goes through ml_dtypes'
    complex32 (:func:`_round_f16`), 2.5x faster than numpy's cast. The compiled conversions (fastcast.py), where
    built, do both in one vector pass with the same bits.
    """
    dtype = np.dtype(dtype)
    if out is None:
        out = np.empty(values.shape, dtype=dtype)
    if dtype == values.dtype:
        if out is not values:
            np.copyto(out, values)
        return out
    rounding = _compiled_rounding(values, out, dtype)
    if rounding is not None:
        rounding(values, bits16(out))
    elif dtype == F16 and values.dtype == F32 and values.flags.c_contiguous and out.flags.c_contiguous:
        _round_f16(values.reshape(-1), out.reshape(-1))
    else:
        np.copyto(out, values, casting="unsafe")
    return out


def _compiled(values: np.ndarray, out: np.ndarray, dtype: np.dtype) -> bool:
    """True when the compiled conversions (fastcast.py) are here and apply: contiguous ``values`` into a
    contiguous ``out`` of ``dtype`` and the same shape."""
    return FAST is not None and out.dtype == dtype and out.shape == values.shape and contiguous(values, out)


def _compiled_rounding(values: np.ndarray, out: np.ndarray, dtype: np.dtype) -> Any:
    """The compiled fp32 -> ``dtype`` rounding that applies to ``values`` and ``out`` (it returns False when an
    output is Inf or NaN), or None."""
    if dtype not in (F16, BF16) or values.dtype != F32 or not _compiled(values, out, dtype):
        return None
    return FAST.f32_to_f16 if dtype == F16 else FAST.f32_to_bf16


def _round_f16(values: np.ndarray, out: np.ndarray) -> None:
    """Flat fp32 ``values`` rounded to fp16 into flat ``out``, through pairs (:data:`C32`): the same bits as
    numpy's cast for every finite and infinite fp32 (all 2**32 checked); a NaN becomes the quiet NaN 0x7E00 with
    its sign, as in Eigen and torch's vector path (numpy keeps payload bits)."""
    pairs = values.size // 2 * 2
    np.copyto(out[:pairs].view(C32), values[:pairs].view(C64), casting="unsafe")
    if pairs < values.size:
        np.copyto(out[pairs:], values[pairs:], casting="unsafe")


def check_values(name: str, values: np.ndarray, dtype: np.dtype, nonfinite_ok: bool = False) -> None:
    """NaN/Inf in fp32 ``values``, or a value beyond ``dtype``'s range, is an error naming tensor ``name``.

    ``nonfinite_ok``: a tensor no edit changed, only converted: its own NaN/Inf stay (the base scan warns about
    them), and only its finite values must fit.
    """
    if values.size == 0:
        return
    # One pass each, no mask: NaN propagates into min and max, Inf shows as one of them.
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        if not nonfinite_ok:
            raise NonFiniteError(f"merged tensor {name!r} has NaN or Inf; check the adapters' weights and scales")
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    dtype, peak = np.dtype(dtype), max(-low, high)
    limit = FINITE_LIMIT.get(dtype)
    if limit is not None and (peak >= ROUNDS_TO_INF[dtype] if dtype in ROUNDS_TO_INF else peak > limit):
        raise DtypeOverflowError(
            f"tensor {name!r} reaches {peak:.4g}, beyond the {short_name(dtype)} range ({limit:.4g}); "
            "use --dtype bf16 or fp32"
        )


def checked_round(name: str, values: np.ndarray, dtype: np.dtype, out: np.ndarray, nonfinite_ok: bool = False) -> None:
    """:func:`check_values` then :func:`round_to` into ``out``; with the compiled roundings (fastcast.py) in one
    pass that also tells whether any output is Inf or NaN, and the full check only then (it names the reason)."""
    dtype = np.dtype(dtype)
    rounding = _compiled_rounding(values, out, dtype)
    if rounding is not None:
        if not rounding(values, bits16(out)):
            check_values(name, values, dtype, nonfinite_ok)
        return
    check_values(name, values, dtype, nonfinite_ok)
    round_to(values, dtype, out=out)


def squared_norm(values: np.ndarray) -> float:
    """``||values||_F^2`` to about 1e-8 relative at fp32 speed: fp32 sums of ``NORM_ROW`` squares, added in fp64.

    One fp32 dot product over 12.5M elements was 4.5e-5 off (it would flatter the reported errors); rows of 128
    were 7e-11 to 4e-9 off, in 1.9 ms, against 8-17 ms for an fp64 sum of every square (rows of 4096: 2e-8 off).
    """
    flat = values.reshape(-1)
    whole = flat.size // NORM_ROW * NORM_ROW
    rows = flat[:whole].reshape(-1, NORM_ROW)
    rest = flat[whole:]
    return float(np.einsum("ij,ij->i", rows, rows).sum(dtype=F64) + np.einsum("i,i->", rest, rest, dtype=F64))


def frobenius_norm(values: np.ndarray) -> float:
    """||values||_F, to about fp64 accuracy (see :func:`squared_norm`)."""
    return math.sqrt(squared_norm(values))
