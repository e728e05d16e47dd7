"""Q8_0 quantization in vectorised numpy, byte for byte gguf-py's ``Q8_0.quantize_blocks`` (which is itself bit
exact with ggml's reference): per block of 32 values ``d = max|x| / 127``, ``q = round_half_away(x * (1 / d))``,
stored as float16 ``d`` then 32 int8 ``q``.

gguf-py builds several full-size temporaries per step, takes a float max over each block and concatenates groups
of rows at the end (6.3 ns a value on the test machine, one thread); here the scale is the same float32 arithmetic,
the block max an int32 max of ``|x|``'s bits, the rounding one add before the int8 cast's truncation, all in place
on cache-sized chunks written straight into the output (2.5 ns a value). Where the compiled conversions are
built (fastcast.py), the same float32 steps run there (0.3 ns a value).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .fastcast import FAST
from .names.gguf import require_gguf

BLOCK = 32  # values per Q8_0 block
BLOCK_BYTES = 2 + BLOCK  # float16 scale + 32 int8
CHUNK_BLOCKS = 2048  # blocks per pass: 256 KiB of float32, stays in cache
HALF_DOWN = np.float32(0.5) - np.float32(2.0**-25)  # the float32 just below 0.5


def quantize(values: np.ndarray, qtype: Any) -> np.ndarray:
    """``values`` as GGUF type ``qtype`` (a ``gguf.GGMLQuantizationType``), as gguf-py's ``quants.quantize``
    makes them: Q8_0 here (same bytes, 2.5x faster), every other type by gguf-py."""
    gguf = require_gguf()
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return quantize_q8_0(values)
    return np.ascontiguousarray(gguf.quants.quantize(values, qtype))


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    """``values`` (any float dtype; the last axis a multiple of 32) as Q8_0 bytes, shape ``(..., last / 32 * 34)``.

    The same float32 steps as gguf-py, in the same order, so every byte matches, including ties (rounded away
    from zero) and blocks whose scale's reciprocal overflows (those go through gguf-py's exact expression).
    """
    if values.shape[-1] % BLOCK:
        raise ValueError(f"Q8_0 needs rows of whole {BLOCK}-value blocks, not {values.shape[-1]}")
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, BLOCK)
    out = np.empty((flat.shape[0], BLOCK_BYTES), dtype=np.uint8)
    if FAST is not None and FAST.q8_0(flat, out):  # the same steps compiled (fastcast.py); False: a tiny scale
        return out.reshape(*values.shape[:-1], values.shape[-1] // BLOCK * BLOCK_BYTES)
    scales = out[:, :2].view(np.float16)  # (blocks, 1)
    quants = out[:, 2:].view(np.int8)
    work = np.empty((min(CHUNK_BLOCKS, flat.shape[0]), BLOCK), dtype=np.float32)
    frac = np.empty_like(work)
    for start in range(0, flat.shape[0], CHUNK_BLOCKS):
        stop = min(start + CHUNK_BLOCKS, flat.shape[0])
        x, a, f = flat[start:stop], work[: stop - start], frac[: stop - start]
        np.abs(x, out=a)
        # |x| has no sign bit: its float order is its int32 order, and numpy's int max runs 3x its float max
        d = a.view(np.int32).max(axis=1, keepdims=True).view(np.float32)
        d /= np.float32(127)
        with np.errstate(divide="ignore"):
            inverse = np.float32(1) / d
        inverse[d == 0] = 0
        if np.isinf(inverse).any():
            # a tiny scale: gguf-py's rounding turns x * inf into nan, the shortcut below into inf, and how those cast
            # to int8 is the CPU's (the same on x86, not on ARM): take gguf-py's path for such chunks
            np.copyto(quants[start:stop], _gguf_round(x * inverse), casting="unsafe")
        else:
            # |q| <= ~127.0: q + copysign(0.5 - 2**-25, q), truncated by the int8 cast, is q rounded half away
            # from zero in float32 (0.5 itself would round 0.49999997 up; the test checks every float in between)
            np.multiply(x, inverse, out=a)
            np.copysign(HALF_DOWN, a, out=f)
            a += f
            np.copyto(quants[start:stop], a, casting="unsafe")
        np.copyto(scales[start:stop], d, casting="unsafe")
    return out.reshape(*values.shape[:-1], values.shape[-1] // BLOCK * BLOCK_BYTES)


def _gguf_round(q: np.ndarray) -> np.ndarray:
    """gguf-py's round-half-away-from-zero, step for step (for the non-finite values of tiny-scale blocks)."""
    a = np.abs(q)
    floored = np.floor(a)
    return np.sign(q) * (floored + np.floor(2 * (a - floored)))
