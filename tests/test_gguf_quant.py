"""lorafuse's vectorised Q8_0 quantizer gives the bytes gguf-py's (llama.cpp's reference in numpy) gives, on every
kind of block: random at many scales, zero, subnormal, tiny scales whose reciprocal overflows, huge values, exact
ties, and every float32 where rounding half away from zero is delicate."""

from __future__ import annotations

import gguf  # the gguf extra is part of the test extra: a missing one fails, never skips
import ml_dtypes
import numpy as np
import pytest
from helpers import conversion_path

from lorafuse import gguf_quant
from lorafuse.gguf_quant import CHUNK_BLOCKS, quantize, quantize_q8_0

Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def quantizer(request, monkeypatch):
    """Every test on both quantizers: the compiled one (fastcast.py, where built) and the numpy one."""
    return conversion_path(request, monkeypatch, gguf_quant)


def reference(values: np.ndarray) -> np.ndarray:
    return np.asarray(gguf.quants.quantize(values, Q8_0))


def assert_same_bytes(values: np.ndarray) -> None:
    mine, want = quantize_q8_0(values), reference(values)
    assert mine.dtype == np.uint8 and mine.shape == want.shape
    if not np.array_equal(mine, want):
        bad = np.flatnonzero((mine != want).reshape(-1, 34).any(axis=1))
        block = values.astype(np.float32).reshape(-1, 32)[bad[0]]
        raise AssertionError(f"{bad.size} blocks differ, first {bad[0]}: {block.tolist()}")


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 0.02, 1.0, 300.0, 1e30])
def test_random_blocks_at_many_scales(scale):
    rng = np.random.default_rng(int(np.log10(scale)) + 40)
    # more than one chunk, with a ragged last one
    values = (rng.standard_normal((CHUNK_BLOCKS + 77, 64)) * scale).astype(np.float32)
    assert_same_bytes(values)


def test_zero_blocks_and_signed_zeros():
    values = np.zeros((8, 32), dtype=np.float32)
    values[1] = -0.0
    values[2, ::2] = -0.0
    values[3, 5] = 1.0  # one value, the rest zero
    values[4, 7] = -3.0
    assert_same_bytes(values)


def test_subnormal_and_tiny_scales():
    """A block whose max is below 127 * 2**-128 has a scale whose reciprocal overflows to inf: gguf-py's bytes for
    those (inf/nan cast to int8) are matched too, beside ordinary blocks of the same chunk."""
    tiny = np.finfo(np.float32).smallest_subnormal
    rng = np.random.default_rng(1)
    values = rng.standard_normal((6, 32)).astype(np.float32)
    values[0] = tiny * rng.integers(-50, 50, 32)
    values[1] = np.float32(1e-38) * rng.standard_normal(32).astype(np.float32)  # normal values, tiny scale
    values[2] = np.float32(3e-37) * rng.standard_normal(32).astype(np.float32)
    values[3, :] = 0
    values[3, 0] = tiny
    values[4] = np.float32(2e-36) * rng.standard_normal(32).astype(np.float32)  # reciprocal just finite
    assert np.isinf(np.float32(1) / (np.abs(values[1]).max() / np.float32(127)))
    assert_same_bytes(values)


def test_huge_values():
    big = np.finfo(np.float32).max
    rng = np.random.default_rng(2)
    values = rng.uniform(-1, 1, (5, 32)).astype(np.float32) * big
    values[0, 0] = big
    values[1, 3] = -big
    values[2] = big  # every value the max: the scale overflows float16 to inf
    assert_same_bytes(values)


def test_exact_ties_round_away_from_zero():
    """With a block max of 127 the scale is exactly 1: the other values are quantized as they are, so halves
    (k + 0.5) are exact ties."""
    halves = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)
    body = np.resize(halves, (len(halves) + 30) // 31 * 31).reshape(-1, 31)
    values = np.concatenate([np.full((body.shape[0], 1), 127, dtype=np.float32), body], axis=1)
    assert_same_bytes(values)
    q = quantize_q8_0(values).reshape(-1, 34)[:, 3:].view(np.int8).reshape(-1)[: len(halves)]
    assert q.tolist() == [int(np.sign(h) * (abs(h) + 0.5)) for h in halves]


def _with_unit_scale(values: np.ndarray) -> np.ndarray:
    """``values`` laid out 31 to a block after a 127, so each is quantized as itself."""
    body = np.resize(values, -(-len(values) // 31) * 31).reshape(-1, 31)
    return np.concatenate([np.full((body.shape[0], 1), 127, dtype=np.float32), body], axis=1)


def test_every_float_between_a_quarter_and_one():
    """The rounding shortcut is delicate only where adding just under 0.5 could carry: every float32 in [0.25, 1),
    both signs."""
    bits = np.arange(np.float32(0.25).view(np.int32), np.float32(1.0).view(np.int32), dtype=np.int32)
    positive = bits.view(np.float32)
    assert_same_bytes(_with_unit_scale(positive))
    assert_same_bytes(_with_unit_scale(-positive))


def test_floats_around_every_half_integer():
    """The 2048 float32s on each side of k + 0.5 and of k, for every k a block's values can reach."""
    centers = np.concatenate([np.arange(128) + 0.5, np.arange(1, 128)]).astype(np.float32).view(np.int32)
    bits = (centers[:, None] + np.arange(-2048, 2049, dtype=np.int32)).reshape(-1)
    values = bits.view(np.float32)
    values = values[(values > 0) & (values <= 127)]
    assert_same_bytes(_with_unit_scale(values))
    assert_same_bytes(_with_unit_scale(-values))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_other_input_dtypes_and_shapes(dtype):
    rng = np.random.default_rng(3)
    values = rng.standard_normal((3, 4, 96)).astype(dtype)
    mine = quantize(values, Q8_0)
    assert mine.shape == (3, 4, 102)
    assert np.array_equal(mine, reference(values))


def test_other_types_go_to_gguf_py():
    values = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q5_1, gguf.GGMLQuantizationType.BF16):
        assert np.array_equal(quantize(values, qtype), np.asarray(gguf.quants.quantize(values, qtype)))


def test_rows_of_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="whole 32-value blocks"):
        quantize_q8_0(np.zeros((2, 48), dtype=np.float32))


def test_non_finite_blocks_take_the_numpy_steps(quantizer, monkeypatch):
    """A block holding Inf or NaN: the compiled quantizer hands the call to the numpy steps (how such values become
    int8 is numpy's and the CPU's), so both paths give the same bytes."""
    from lorafuse import gguf_quant

    values = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    values[1, 3], values[2, 40] = np.inf, np.nan
    with np.errstate(invalid="ignore"):
        ours = quantize_q8_0(values)
        monkeypatch.setattr(gguf_quant, "FAST", None)
        numpy_steps = quantize_q8_0(values)
    assert np.array_equal(ours, numpy_steps)
    assert np.array_equal(ours[0], reference(values[:1])[0])  # the finite rows as gguf-py writes them
