"""The numpy kernel (engine/kernel.py): row blocks, row ranges and the torch kernel write exactly what the math says.

Row blocks of any size give the bytes of whole-tensor blocks; results are within one rounding step of a float64
reference computed here; an edit on a range of a fused weight's rows writes what the same edit writes on the
separate weight; NaN/Inf and overflow are errors; the torch kernel (``--device cuda``) runs the same plan and
edits (here on torch's CPU device) within one rounding step.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorafuse.arrays import BF16, F16, F32
from lorafuse.edits import DoraDelta, FullDiff, LoraDelta, Replace, TensorRef
from lorafuse.engine import kernel
from lorafuse.engine.cuda import CudaMerger
from lorafuse.errors import DtypeOverflowError, NonFiniteError
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.merger import write_model
from lorafuse.plan import MergePlan, OutputTensor, PlacedEdit

TORCH_DTYPE = {BF16: torch.bfloat16, F16: torch.float16, F32: torch.float32}


def _lora(adapter: Checkpoint, key: str, scale: float, layout: str = "linear") -> LoraDelta:
    return LoraDelta(TensorRef(adapter, f"{key}.A"), TensorRef(adapter, f"{key}.B"), scale, layout)


def _setup(tmp_path: Path, base_dtype: np.dtype, count: int = 1) -> tuple[Checkpoint, Checkpoint]:
    """A base with odd-sized linear, transposed and conv weights (``count`` copies) and LoRA factors for them."""
    gen = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    for i in range(count):
        base[f"lin{i}"] = torch.randn(67, 40, generator=gen).to(TORCH_DTYPE[base_dtype])
        base[f"tr{i}"] = torch.randn(53, 24, generator=gen).to(TORCH_DTYPE[base_dtype])
        base[f"conv{i}"] = torch.randn(37, 5, 3, 3, generator=gen).to(TORCH_DTYPE[base_dtype])
        base[f"dora{i}"] = torch.randn(45, 40, generator=gen).to(TORCH_DTYPE[base_dtype])
        base[f"norm{i}"] = torch.randn(40, generator=gen).to(TORCH_DTYPE[base_dtype])
        for key, a_shape, b_shape in (
            (f"lin{i}", (3, 40), (67, 3)),
            (f"lin{i}.second", (2, 40), (67, 2)),
            (f"tr{i}", (4, 53), (24, 4)),  # transposed: W (in=53, out=24)
            (f"conv{i}", (2, 5, 3, 3), (37, 2, 1, 1)),
            (f"dora{i}", (3, 40), (45, 3)),
        ):
            adapter[f"{key}.A"] = torch.randn(*a_shape, generator=gen)
            adapter[f"{key}.B"] = torch.randn(*b_shape, generator=gen)
        adapter[f"dora{i}.m"] = torch.rand(45, generator=gen) + 0.5
        adapter[f"dora{i}.diff"] = torch.randn(45, 40, generator=gen)
    adapter["diff"] = torch.randn(40, generator=gen)
    save_file(base, tmp_path / "base.safetensors")
    save_file(adapter, tmp_path / "adapter.safetensors")
    return Checkpoint([tmp_path / "base.safetensors"]), Checkpoint([tmp_path / "adapter.safetensors"])


def _plan(base: Checkpoint, adapter: Checkpoint, out_dtype: np.dtype, count: int = 1) -> MergePlan:
    tensors = []
    for i in range(count):
        ref = lambda key, i=i: TensorRef(adapter, f"dora{i}.{key}")  # noqa: E731
        dora = DoraDelta(ref("A"), ref("B"), 0.9, magnitude=ref("m"))
        edits = {
            f"lin{i}": [_lora(adapter, f"lin{i}", 0.7), _lora(adapter, f"lin{i}.second", -1.3)],
            f"tr{i}": [_lora(adapter, f"tr{i}", 2.0, "transposed")],
            f"conv{i}": [_lora(adapter, f"conv{i}", 0.5, "conv")],
            f"dora{i}": [FullDiff(ref("diff"), 0.1), dora],  # the norm of the rows before the diff
            f"norm{i}": [FullDiff(TensorRef(adapter, "diff"), 0.25)],
        }
        for name, tensor_edits in edits.items():
            info = base.infos[name]
            tensors.append(OutputTensor(name, name, out_dtype, info.shape, [PlacedEdit(e) for e in tensor_edits]))
    return MergePlan(base, tensors)


def _write(plan: MergePlan, folder: Path) -> Checkpoint:
    folder.mkdir()
    written = write_model(plan, folder, "model", 1 << 40)
    return Checkpoint([folder / written.files[0]])


def _f64(ckpt: Checkpoint, name: str) -> np.ndarray:
    return ckpt.array(name).astype(np.float64)


def _reference(base: Checkpoint, adapter: Checkpoint, name: str) -> np.ndarray:
    """What the edits of ``_plan`` compute, in float64 with numpy, written here (not through lorafuse)."""
    a = lambda key: _f64(adapter, key)  # noqa: E731
    w = _f64(base, name)
    if name.startswith("lin"):
        return w + 0.7 * a(f"{name}.B") @ a(f"{name}.A") - 1.3 * a(f"{name}.second.B") @ a(f"{name}.second.A")
    if name.startswith("tr"):
        return w + 2.0 * (a(f"{name}.B") @ a(f"{name}.A")).T
    if name.startswith("conv"):
        return w + 0.5 * (a(f"{name}.B").reshape(37, 2) @ a(f"{name}.A").reshape(2, -1)).reshape(w.shape)
    if name.startswith("dora"):  # DoRA's norm is the base's, before the diff: W' = m * (W + dW) / ||W0 + dW||
        delta = 0.9 * a(f"{name}.B") @ a(f"{name}.A")
        factor = (a(f"{name}.m") / np.linalg.norm(w + delta, axis=1)).reshape(-1, 1)
        return (w + 0.1 * a(f"{name}.diff") + delta) * factor
    return w + 0.25 * a("diff")


def _steps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """How many representable values apart two arrays of a 16-bit float dtype are, element by element."""
    bits = lambda x: x.view(np.int16).astype(np.int32)  # noqa: E731  (same sign here: a difference of steps)
    return np.abs(bits(got) - bits(want))


def _within_one_rounding(got: np.ndarray, want: np.ndarray, mantissa_bits: int) -> None:
    """``got`` (fp32 math, one rounding) is within one step of the output dtype of the float64 ``want``, plus the
    fp32 error of sums that cancel (relative to the tensor's largest value, as lorafuse verify allows)."""
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 2.0**-14))) - mantissa_bits)
    error = np.abs(got.astype(np.float64) - want)
    assert (error <= step + 2.0**-20 * np.abs(want).max()).all()
    assert (error <= step / 2 * 1.001).mean() > 0.99  # correctly rounded, but for near-ties of the fp32 sums


@pytest.mark.parametrize("base_dtype,out_dtype", [(BF16, BF16), (F16, F16), (BF16, F32)], ids=["bf16", "fp16", "fp32"])
def test_row_blocks_write_the_bytes_of_whole_tensors_within_one_rounding_of_float64(
    tmp_path, monkeypatch, base_dtype, out_dtype
):
    count = 5  # more tensors than threads: buffers are reused across tensors of other shapes
    base, adapter = _setup(tmp_path, base_dtype, count)
    plan = _plan(base, adapter, out_dtype, count)
    whole = _write(plan, tmp_path / "whole")
    # Blocks of 17 rows for the 67-row weight: several blocks per tensor, the last one not a multiple of 16.
    monkeypatch.setattr(kernel, "ROW_BLOCK_BYTES", 40 * 4 * 20)
    split = _write(plan, tmp_path / "split")
    for tensor in plan.tensors:
        got = split.array(tensor.name)
        assert got.dtype == out_dtype and got.shape == tensor.shape
        assert got.tobytes() == whole.array(tensor.name).tobytes(), tensor.name
        assert got.tobytes() == kernel.compute_tensor(plan, tensor).tobytes(), tensor.name  # what verify computes
        want = _reference(base, adapter, tensor.name)
        if out_dtype == F32:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=tensor.name)
        else:  # the fp32 sums round once to the output
            _within_one_rounding(got, want, 7 if out_dtype == BF16 else 10)
        assert not np.array_equal(got.astype(np.float64), _f64(base, tensor.name)), tensor.name  # changed


def test_an_edit_on_rows_of_a_fused_weight_writes_what_it_writes_on_the_separate_weight(tmp_path, monkeypatch):
    """``to_q``/``to_k``/``to_v`` LoRAs on rows 0..d, d..2d, 2d..3d of a fused ``qkv``: byte for byte the merge of
    the separate weights, whatever the row blocks (these split inside the ranges)."""
    gen = torch.Generator().manual_seed(3)
    d, width = 24, 40
    parts = {p: torch.randn(d, width, generator=gen).bfloat16() for p in "qkv"}
    save_file({**{f"{p}.weight": t for p, t in parts.items()}, "qkv.weight": torch.cat(list(parts.values()))},
              tmp_path / "base.safetensors")  # fmt: skip
    factors = {}
    for p in "qkv":
        factors[f"{p}.A"] = torch.randn(4, width, generator=gen)
        factors[f"{p}.B"] = torch.randn(d, 4, generator=gen)
    save_file(factors, tmp_path / "adapter.safetensors")
    base, adapter = Checkpoint([tmp_path / "base.safetensors"]), Checkpoint([tmp_path / "adapter.safetensors"])
    edit = {p: _lora(adapter, p, 0.5 + i) for i, p in enumerate("qkv")}
    separate = [OutputTensor(f"{p}.weight", f"{p}.weight", BF16, (d, width), [PlacedEdit(edit[p])]) for p in "qkv"]
    placed = [PlacedEdit(edit[p], (i * d, (i + 1) * d)) for i, p in enumerate("qkv")]
    fused = [OutputTensor("qkv.weight", "qkv.weight", BF16, (3 * d, width), placed)]
    for block in (None, width * 4 * 10):
        if block is not None:
            monkeypatch.setattr(kernel, "ROW_BLOCK_BYTES", block)  # 10 rows: blocks straddle the ranges
        tag = "whole" if block is None else "split"
        ours = _write(MergePlan(base, fused), tmp_path / f"fused-{tag}").array("qkv.weight")
        theirs = _write(MergePlan(base, separate), tmp_path / f"separate-{tag}")
        expected = np.concatenate([theirs.array(f"{p}.weight") for p in "qkv"])
        assert ours.tobytes() == expected.tobytes(), tag
        assert not np.array_equal(ours, base.array("qkv.weight"))


def test_a_row_range_that_does_not_fit_is_refused_by_the_plan(tmp_path):
    from lorafuse.edits import TargetedEdit
    from lorafuse.errors import ShapeMismatchError
    from lorafuse.plan import AdapterInput, build_plan

    base, adapter = _setup(tmp_path, BF16)
    lora = _lora(adapter, "lin0", 1.0)  # 67 rows
    for rows in ((0, 60), (10, 77), (5, 5)):
        with pytest.raises(ShapeMismatchError, match="does not fit base tensor 'lin0'"):
            build_plan(base, [AdapterInput("a", [TargetedEdit("lin0", lora, rows)])])
    plan = build_plan(base, [AdapterInput("a", [TargetedEdit("lin0", _lora(adapter, "dora0", 1.0), (10, 55))])])
    (lin,) = [t for t in plan.tensors if t.name == "lin0"]
    assert [p.rows for p in lin.edits] == [(10, 55)]


def test_a_replacement_saved_whole_needs_no_base_read(tmp_path, monkeypatch):
    """What a full replacement overwrites is never read or computed (the plan drops edits before it)."""
    base, adapter = _setup(tmp_path, F32)
    save_file({"new": torch.full((40,), 2.0)}, tmp_path / "saved.safetensors")
    saved = Checkpoint([tmp_path / "saved.safetensors"])
    from lorafuse.edits import TargetedEdit
    from lorafuse.plan import AdapterInput, build_plan

    diff, new = FullDiff(TensorRef(adapter, "diff")), Replace(TensorRef(saved, "new"))
    edits = [TargetedEdit("norm0", diff), TargetedEdit("norm0", new)]
    plan = build_plan(base, [AdapterInput("a", edits)], check_values=False)
    (norm,) = [t for t in plan.tensors if t.name == "norm0"]
    assert [type(p.edit) for p in norm.edits] == [Replace] and not kernel.reads_base(norm)
    assert kernel.compute_tensor(plan, norm).tolist() == [2.0] * 40


def test_non_finite_base_is_an_error(tmp_path, monkeypatch):
    base, adapter = _setup(tmp_path, BF16)
    data = {k: torch.from_numpy(base.array(k).view(np.int16)).view(torch.bfloat16) for k in base.keys()}
    data["lin0"][60, 3] = float("nan")  # in the last row block
    save_file(data, tmp_path / "nan.safetensors")
    plan = _plan(Checkpoint([tmp_path / "nan.safetensors"]), adapter, BF16)
    monkeypatch.setattr(kernel, "ROW_BLOCK_BYTES", 40 * 4 * 20)
    with pytest.raises(NonFiniteError, match="lin0"):
        _write(plan, tmp_path / "out")


def test_fp16_overflow_is_an_error(tmp_path):
    base, adapter = _setup(tmp_path, F32)
    data = {k: torch.from_numpy(base.array(k)) for k in base.keys()}
    data["lin0"][5, 7] = 1e6  # fine in fp32, Inf in fp16
    save_file(data, tmp_path / "big.safetensors")
    plan = _plan(Checkpoint([tmp_path / "big.safetensors"]), adapter, F16)
    with pytest.raises(DtypeOverflowError, match="lin0"):
        _write(plan, tmp_path / "out")


@pytest.mark.parametrize("out_dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_the_torch_kernel_applies_the_same_plan_and_edits(tmp_path, out_dtype):
    """engine/cuda.py merges with the same edits through torch (TorchOps); on torch's CPU device here, so that CI
    without a GPU runs it: within one rounding step of the numpy kernel (sums associate differently)."""
    base, adapter = _setup(tmp_path, BF16, 2)
    plan = _plan(base, adapter, out_dtype, 2)
    for tensor in plan.tensors:
        ours = kernel.compute_tensor(plan, tensor)
        theirs = kernel.tensor_array(tensor, CudaMerger(plan, "cpu").merge)
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
        if out_dtype == F32:
            np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5, err_msg=tensor.name)
        else:
            assert _steps(theirs, ours).max() <= 1, tensor.name


def test_bf16_rounding_is_to_nearest_even(tmp_path):
    """One rounding, ties to even, as torch rounds: values exactly between two bf16 numbers."""
    save_file({"w": torch.zeros(2, 4)}, tmp_path / "base.safetensors")
    ties = np.array([[1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-7 + 2**-15], [1, 2, 3, 4]], dtype=np.float32)
    save_file({"d": torch.from_numpy(ties)}, tmp_path / "diff.safetensors")
    base, diff = Checkpoint([tmp_path / "base.safetensors"]), Checkpoint([tmp_path / "diff.safetensors"])
    out = OutputTensor("w", "w", BF16, (2, 4), [PlacedEdit(FullDiff(TensorRef(diff, "d")))])
    got = kernel.compute_tensor(MergePlan(base, [out]), out)
    assert got.tobytes() == torch.from_numpy(ties).bfloat16().view(torch.int16).numpy().tobytes()
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
