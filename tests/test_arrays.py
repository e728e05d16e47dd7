"""The numpy tensor layer (arrays.py) rounds and decodes exactly as torch does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorafuse import arrays
from lorafuse.errors import DtypeOverflowError, LorafuseError, NonFiniteError
from lorafuse.torch_bridge import to_numpy, to_torch


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
