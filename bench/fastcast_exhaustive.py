"""The exhaustive check behind lorafuse's compiled conversions (src/lorafuse/_fastcast.c): every fp32 bit pattern
rounded to fp16 and to bf16, every fp16 and bf16 pattern widened, against numpy's and ml_dtypes' own casts. NaN
outputs must stay NaN (their payload may differ). About 5 minutes on the 2-core VM; the test suite runs a sample
(tests/test_fastcast.py). Usage::

    python bench/fastcast_exhaustive.py
"""

from __future__ import annotations

import sys
import time

import ml_dtypes
import numpy as np

from lorafuse import fastcast

CHUNK = 1 << 24


def main() -> int:
    fast = fastcast.FAST
    if fast is None:
        print("the C extension is not built here (or LORAFUSE_FASTCAST=0)")
        return 1
    started, bad = time.time(), 0
    every16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = np.empty(every16.size, dtype=np.float32)
    fast.f16_to_f32(every16, widened)
    want = every16.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    bad += int((widened.view(np.uint32) != want.view(np.uint32))[~nan].sum()) + int((~np.isnan(widened[nan])).sum())
    halves = np.empty(every16.size, dtype=np.uint16)
    fast.bf16_to_f16(every16, halves)
    with np.errstate(all="ignore"):
        want16 = every16.view(ml_dtypes.bfloat16).astype(np.float32).astype(np.float16)
    nan = np.isnan(want16)
    bad += int((halves != want16.view(np.uint16))[~nan].sum())
    bits = np.empty(CHUNK, dtype=np.uint32)
    out16, outb = np.empty(CHUNK, dtype=np.uint16), np.empty(CHUNK, dtype=np.uint16)
    for k in range((1 << 32) // CHUNK):
        bits[:] = np.arange(k * CHUNK, (k + 1) * CHUNK, dtype=np.uint64).astype(np.uint32)
        values = bits.view(np.float32)
        fast.f32_to_f16(values, out16)
        fast.f32_to_bf16(values, outb)
        with np.errstate(all="ignore"):
            want_f16 = values.astype(np.float16).view(np.uint16)
            want_bf16 = values.astype(ml_dtypes.bfloat16).view(np.uint16)
        nan = np.isnan(values)
        bad += int((out16 != want_f16)[~nan].sum()) + int((outb != want_bf16)[~nan].sum())
        bad += int((~np.isnan(out16.view(np.float16)[nan])).sum())
    print(f"{bad} mismatches over every fp32, fp16 and bf16 pattern ({time.time() - started:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
