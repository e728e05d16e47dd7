"""The compiled conversions (lorafuse/_fastcast.c via fastcast.py) against numpy's and ml_dtypes' own casts, and
the merge bytes with and without them."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from lorafuse import arrays, fastcast

pytestmark = pytest.mark.skipif(
    fastcast.FAST is None, reason="the C extension is not built here (no C compiler at install, or not x86-64/F16C)"
)


def _fp32_patterns(n: int = 1 << 21) -> np.ndarray:
    """Uniform fp32 bit patterns (every exponent, both signs) plus the fp16/bf16 ties, overflow edges and
    subnormals."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    ties16 = (bits & 0xFFFFE000) | 0x1000
    ties_bf16 = (bits & 0xFFFF0000) | 0x8000
    edges = np.array([65503, 65504, 65519.99, 65520, -65520, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-40, -0.0, np.inf,
                      -np.inf, 3.3895e38, 3.3961e38, 3.3962e38], dtype=np.float32)  # fmt: skip
    return np.concatenate([bits.view(np.float32), ties16.view(np.float32), ties_bf16.view(np.float32), edges])


def test_every_fp16_decodes_as_numpy_does():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(every.size, dtype=np.float32)
    fastcast.FAST.f16_to_f32(every, out)
    want = every.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan]) and np.isnan(out[nan]).all()


def test_every_bf16_becomes_the_fp16_numpy_gives():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(every.size, dtype=np.uint16)
    fastcast.FAST.bf16_to_f16(every, out)
    with np.errstate(all="ignore"):
        want = every.view(ml_dtypes.bfloat16).astype(np.float32).astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(out[~nan], want.view(np.uint16)[~nan]) and np.isnan(out.view(np.float16)[nan]).all()


@pytest.mark.parametrize("target", ["f16", "bf16"])
def test_rounding_is_numpy_s_and_ml_dtypes_bit_for_bit(target):
    values = _fp32_patterns()
    dtype = np.float16 if target == "f16" else ml_dtypes.bfloat16
    with np.errstate(all="ignore"):
        want = values.astype(dtype).view(np.uint16)
    out = np.empty(values.size, dtype=np.uint16)
    finite = (fastcast.FAST.f32_to_f16 if target == "f16" else fastcast.FAST.f32_to_bf16)(values, out)
    nan = np.isnan(values)
    assert np.array_equal(out[~nan], want[~nan])
    assert np.isnan(out.view(dtype)[nan].astype(np.float32)).all()
    assert not finite  # the patterns hold NaN and Inf


@pytest.mark.parametrize("size", list(range(0, 18)) + [1000, 1001])
def test_tails_and_the_finite_flag(size):
    values = np.linspace(-3, 3, size, dtype=np.float32)
    out = np.empty(size, dtype=np.uint16)
    assert fastcast.FAST.f32_to_f16(values, out)
    assert np.array_equal(out, values.astype(np.float16).view(np.uint16))
    if size:
        values[-1] = 65520.0  # rounds to Inf: the flag says so, whichever lane it is in
        assert not fastcast.FAST.f32_to_f16(values, out)
        values[-1] = 65519.0  # rounds to 65504: finite
        assert fastcast.FAST.f32_to_f16(values, out)
        values[0] = np.nan
        assert not fastcast.FAST.f32_to_bf16(values, out)


def test_sizes_must_match():
    with pytest.raises(ValueError, match="sizes do not match"):
        fastcast.FAST.f32_to_f16(np.zeros(4, np.float32), np.zeros(3, np.uint16))


def test_flush_to_zero_in_the_thread_does_not_change_the_bits():
    # torch.set_flush_denormal sets FTZ and DAZ for the thread; the conversions run with IEEE semantics anyway.
    subnormal = np.array([2.0**-24, 3 * 2.0**-25, -(2.0**-20)], dtype=np.float32)
    halves = subnormal.astype(np.float16)
    out16, out32 = np.empty(3, np.uint16), np.empty(3, np.float32)
    assert torch.set_flush_denormal(True)
    try:
        fastcast.FAST.f32_to_f16(subnormal, out16)
        fastcast.FAST.f16_to_f32(halves.view(np.uint16), out32)
    finally:
        torch.set_flush_denormal(False)
    assert np.array_equal(out16, halves.view(np.uint16))
    assert np.array_equal(out32, halves.astype(np.float32))


def test_overflow_is_refused_on_both_paths():
    values = np.array([[1.0, 70000.0]], dtype=np.float32)
    out = np.empty((1, 2), dtype=np.float16)
    with pytest.raises(arrays.DtypeOverflowError, match="beyond the float16 range"):
        arrays.checked_round("t", values, arrays.F16, out)
    with pytest.raises(arrays.DtypeOverflowError, match="beyond the float16 range"):
        arrays.check_values("t", values, arrays.F16)
    values[0, 1] = 65519.0  # rounds to 65504 on both paths
    arrays.checked_round("t", values, arrays.F16, out)
    arrays.check_values("t", values, arrays.F16)
    with pytest.raises(arrays.NonFiniteError):
        arrays.checked_round("t", np.array([np.nan, 1], dtype=np.float32), arrays.BF16, np.empty(2, arrays.BF16))


def test_merge_bytes_do_not_depend_on_the_extension(tmp_path):
    """An fp16 and a bf16 merge with the compiled conversions and with LORAFUSE_FASTCAST=0 (numpy's paths)."""
    from helpers import make_llama, make_peft_adapter

    for dtype in (torch.float16, torch.bfloat16):
        base = make_llama(tmp_path / str(dtype).split(".")[-1], dtype=dtype)
        adapter = make_peft_adapter(base, base.parent / "adapter", target_modules=["q_proj", "down_proj"])
        outputs = []
        for flag in ("1", "0"):
            out = tmp_path / f"out-{flag}-{str(dtype).split('.')[-1]}"
            env = {**os.environ, "LORAFUSE_FASTCAST": flag}
            cmd = [sys.executable, "-m", "lorafuse", "merge", str(base), str(adapter), "-o", str(out), "-q"]
            subprocess.run(cmd, check=True, env=env)
            outputs.append((out / "model.safetensors").read_bytes())
        assert outputs[0] == outputs[1]
