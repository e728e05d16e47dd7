"""The numpy tensor layer (arrays.py) rounds and decodes exactly as torch does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import conversion_path

from lorafuse import arrays
from lorafuse.errors import DtypeOverflowError, LorafuseError, NonFiniteError
from lorafuse.torch_bridge import to_numpy, to_torch


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def conversions(request, monkeypatch):
    """Every test on both paths: the compiled conversions (fastcast.py, where built) and numpy's."""
    return conversion_path(request, monkeypatch, arrays)


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(20000).astype(np.float32) * 3
    # Ties and near-ties of bf16 and fp16, subnormals, signed zeros, the largest finite values.
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    bits = bits[(bits & 0x7F800000) != 0x7F800000]  # finite
    ties = (bits & 0xFFFF0000) | 0x8000
    special = np.array([0.0, -0.0, 1e-40, -1e-40, 65504.0, 65519.0, 3.3895e38, 1.0 + 2**-8], dtype=np.float32)
    return np.concatenate([normal, bits.view(np.float32), ties.view(np.float32), special])


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_rounding_is_torch_s_bit_for_bit(name):
    values = _values()
    if name == "fp16":
        values = values[np.abs(values) < 65520]
    dtype = arrays.parse_dtype(name)
    ours = arrays.round_to(values, dtype)
    theirs = torch.from_numpy(values).to({"bf16": torch.bfloat16, "fp16": torch.float16}[name])
    assert np.array_equal(ours.view(np.uint16), to_numpy(theirs).view(np.uint16))


def _fp16_edges() -> np.ndarray:
    """fp16's edges: every subnormal step and the ties between them, the smallest normal, the overflow boundary
    (65504 is the largest finite; 65520 and above round to Inf), infinities."""
    steps = np.arange(-4200, 4201, dtype=np.float64) * 2.0**-26  # quarters of the 2**-24 subnormal step: ties too
    near_max = np.array([65503.0, 65504.0, 65519.99, 65520.0, 65535.0, 65536.0, 1e6, 3.4e38], dtype=np.float64)
    return np.concatenate([steps, [2.0**-14 * (1 - 2.0**-12)], near_max, -near_max, [np.inf, -np.inf]]).astype(
        np.float32
    )


def test_fp16_rounding_edges_are_torch_s():
    values = _fp16_edges()
    with np.errstate(over="ignore"):
        ours = arrays.round_to(values, arrays.F16)
    theirs = to_numpy(torch.from_numpy(values).to(torch.float16))
    assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_nan_stays_nan(name):
    # Only NaN-ness is asserted: torch's NaN bytes depend on the CPU path (here it writes every bf16 NaN as
    # 0xFFFF and quiets fp16 signalling NaNs); a merged tensor with NaN is refused before rounding anyway.
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF], dtype=np.uint32).view(np.float32)
    assert np.isnan(arrays.round_to(nans, arrays.parse_dtype(name)).astype(np.float32)).all()


@pytest.mark.parametrize("code", ["BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"])
def test_decode_matches_torch(code):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, 4096, dtype=np.uint8)
    dtype = arrays.dtype_of(code)
    tensor = to_torch(raw.view(dtype))
    expected = tensor.float().numpy()
    got = arrays.decode_f32(raw, dtype)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert np.array_equal(got[finite], expected[finite])


def _every_fp16(finite: bool) -> np.ndarray:
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    return values[np.isfinite(values)] if finite else values


@pytest.mark.parametrize("finite", [True, False])
def test_fp16_decodes_every_pattern_as_torch(finite):
    # Finite only: the bit decode itself (subnormals and both zeros included); with Inf/NaN: the cast it falls back to.
    values = _every_fp16(finite)
    expected = torch.from_numpy(values).float().numpy()
    got = arrays.decode_f32(values.view(np.uint8), arrays.F16)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    number = ~np.isnan(expected)
    assert np.array_equal(got[number].view(np.uint32), expected[number].view(np.uint32))


def test_fp16_decode_with_subnormals_read_as_zero():
    # DAZ (torch.set_flush_denormal) would zero the fp32 subnormals the bit decode goes through: it takes the cast.
    values = _every_fp16(finite=True)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        got = arrays.decode_f32(values, arrays.F16)
    finally:
        torch.set_flush_denormal(False)
    assert np.array_equal(got.view(np.uint32), torch.from_numpy(values).float().numpy().view(np.uint32))


def test_bridge_round_trips_every_dtype():
    for code, dtype in arrays.CODE_TO_DTYPE.items():
        raw = np.arange(24, dtype=np.uint8).view(np.uint8)[: 24 // dtype.itemsize * dtype.itemsize]
        array = raw.view(dtype)
        back = to_numpy(to_torch(array))
        assert back.dtype == dtype, code
        assert back.tobytes() == array.tobytes(), code


def test_checks_and_names():
    arrays.check_values("t", np.array([1.0, -2.0], dtype=np.float32), arrays.BF16)
    with pytest.raises(NonFiniteError, match="'t'"):
        arrays.check_values("t", np.array([1.0, np.nan], dtype=np.float32), arrays.F32)
    with pytest.raises(DtypeOverflowError, match="float16 range"):
        arrays.check_values("t", np.array([70000.0], dtype=np.float32), arrays.F16)
    with pytest.raises(LorafuseError, match="unknown dtype"):
        arrays.parse_dtype("fp7")
    assert arrays.parse_dtype("auto") is None
    assert arrays.short_name(arrays.BF16) == "bfloat16" == str(torch.bfloat16).removeprefix("torch.")
    assert arrays.code_of(arrays.dtype_of("F8_E4M3")) == "F8_E4M3"
    assert arrays.nbytes_of(arrays.BF16, (3, 4)) == 24


@pytest.mark.parametrize("size", [1, 2, 7, (1 << 20) + 1])
def test_fp16_rounding_equals_numpy_cast_on_any_bits(size):
    # Uniform over every non-NaN fp32 bit pattern (subnormals, overflow to Inf, both signs), odd sizes included:
    # the complex32 pairs path must give numpy's own cast's bits.
    bits = np.random.default_rng(size).integers(0, 1 << 32, size, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = np.where(np.isnan(values), np.float32(1.5), values)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
        ours = arrays.round_to(values, arrays.F16)
        strided = arrays.round_to(values[::2], arrays.F16)
    assert np.array_equal(ours.view(np.uint16), expected.view(np.uint16))
    assert np.array_equal(strided.view(np.uint16), expected[::2].view(np.uint16))


def test_fp16_rounding_of_rows_into_a_buffer():
    values = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    out = np.empty((3, 5), dtype=np.float16)
    assert arrays.round_to(values, arrays.F16, out=out) is out
    assert np.array_equal(out.view(np.uint16), values.astype(np.float16).view(np.uint16))
