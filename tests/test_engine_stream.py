"""The streaming engine's fast path (pooled buffers, fp32 row blocks) writes exactly what whole-tensor math gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorafuse import engine
from lorafuse.edits import FullDiff, LoraDelta, TensorRef
from lorafuse.errors import DtypeOverflowError, NonFiniteError
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.plan import MergePlan, OutputTensor


def _lora(adapter: Checkpoint, key: str, scale: float, layout: str = "linear") -> LoraDelta:
    return LoraDelta(TensorRef(adapter, f"{key}.A"), TensorRef(adapter, f"{key}.B"), scale, layout)


def _setup(tmp_path: Path, base_dtype: torch.dtype, count: int = 1) -> tuple[Checkpoint, Checkpoint]:
    """A base with odd-sized linear, transposed and conv weights (``count`` copies) and LoRA factors for them."""
    gen = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    for i in range(count):
        base[f"lin{i}"] = torch.randn(67, 40, generator=gen).to(base_dtype)
        base[f"tr{i}"] = torch.randn(53, 24, generator=gen).to(base_dtype)
        base[f"conv{i}"] = torch.randn(37, 5, 3, 3, generator=gen).to(base_dtype)
        base[f"norm{i}"] = torch.randn(40, generator=gen).to(base_dtype)
        for key, a_shape, b_shape in (
            (f"lin{i}", (3, 40), (67, 3)),
            (f"lin{i}.second", (2, 40), (67, 2)),
            (f"tr{i}", (4, 53), (24, 4)),  # transposed: W (in=53, out=24)
            (f"conv{i}", (2, 5, 3, 3), (37, 2, 1, 1)),
        ):
            adapter[f"{key}.A"] = torch.randn(*a_shape, generator=gen)
            adapter[f"{key}.B"] = torch.randn(*b_shape, generator=gen)
    adapter["diff"] = torch.randn(40, generator=gen)
    save_file(base, tmp_path / "base.safetensors")
    save_file(adapter, tmp_path / "adapter.safetensors")
    return Checkpoint([tmp_path / "base.safetensors"]), Checkpoint([tmp_path / "adapter.safetensors"])


def _plan(base: Checkpoint, adapter: Checkpoint, out_dtype: torch.dtype, count: int = 1) -> MergePlan:
    tensors = []
    for i in range(count):
        edits = {
            f"lin{i}": [_lora(adapter, f"lin{i}", 0.7), _lora(adapter, f"lin{i}.second", -1.3)],
            f"tr{i}": [_lora(adapter, f"tr{i}", 2.0, "transposed")],
            f"conv{i}": [_lora(adapter, f"conv{i}", 0.5, "conv")],
            f"norm{i}": [FullDiff(TensorRef(adapter, "diff"), 0.25)],  # not row-blocked: whole-tensor path
        }
        for name, tensor_edits in edits.items():
            info = base.infos[name]
            tensors.append(OutputTensor(name, name, out_dtype, info.shape, tensor_edits))
    return MergePlan(base, tensors)


@pytest.mark.parametrize(
    "base_dtype,out_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_row_blocks_match_whole_tensor_math(tmp_path, monkeypatch, base_dtype, out_dtype):
    count = 5  # 20 tensors: more than the buffer pool holds, so buffers come back from the writer and are reused
    base, adapter = _setup(tmp_path, base_dtype, count)
    plan = _plan(base, adapter, out_dtype, count)
    # Blocks of 17 rows for the 67-row weight: several blocks per tensor, the last one not a multiple of 16.
    monkeypatch.setattr(engine, "ROW_BLOCK_BYTES", 40 * 4 * 20)
    out = tmp_path / "out"
    out.mkdir()
    threads = torch.get_num_threads()
    written = engine.write_safetensors(plan, out, "model", 1 << 40)
    assert torch.get_num_threads() == threads
    merged = Checkpoint([out / written.files[0]])
    assert sum(engine._lora_only(t, base.infos[t.source]) for t in plan.tensors) == 3 * count
    for tensor in plan.tensors:
        expected = engine.compute_tensor(plan, tensor)
        got = merged.get(tensor.name)
        assert got.dtype == out_dtype
        assert torch.equal(got.view(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), tensor.name
        assert not torch.equal(got.float(), base.get(tensor.name).float())  # the edit did something


def test_row_blocks_match_independent_reference(tmp_path, monkeypatch):
    """Against plain fp32 math written here, not through the engine: W + s1*B1@A1 + s2*B2@A2, rounded once."""
    base, adapter = _setup(tmp_path, torch.float32)
    plan = _plan(base, adapter, torch.float32)
    monkeypatch.setattr(engine, "ROW_BLOCK_BYTES", 40 * 4 * 20)
    out = tmp_path / "out"
    out.mkdir()
    written = engine.write_safetensors(plan, out, "model", 1 << 40)
    got = Checkpoint([out / written.files[0]]).get("lin0")
    a = adapter.get
    want = base.get("lin0") + 0.7 * a("lin0.B") @ a("lin0.A") - 1.3 * a("lin0.second.B") @ a("lin0.second.A")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_tr = Checkpoint([out / written.files[0]]).get("tr0")
    torch.testing.assert_close(got_tr, base.get("tr0") + 2.0 * (a("tr0.B") @ a("tr0.A")).T, rtol=1e-5, atol=1e-5)


def test_non_finite_base_is_an_error(tmp_path, monkeypatch):
    base, adapter = _setup(tmp_path, torch.bfloat16)
    data = {k: base.get(k) for k in base.keys()}
    data["lin0"][60, 3] = float("nan")  # in the last row block
    save_file(data, tmp_path / "nan.safetensors")
    bad = Checkpoint([tmp_path / "nan.safetensors"])
    plan = _plan(bad, adapter, torch.bfloat16)
    monkeypatch.setattr(engine, "ROW_BLOCK_BYTES", 40 * 4 * 20)
    (tmp_path / "out").mkdir()
    with pytest.raises(NonFiniteError, match="lin0"):
        engine.write_safetensors(plan, tmp_path / "out", "model", 1 << 40)


def test_fp16_overflow_is_an_error(tmp_path):
    base, adapter = _setup(tmp_path, torch.float32)
    data = {k: base.get(k) for k in base.keys()}
    data["lin0"][5, 7] = 1e6  # fine in fp32, Inf in fp16
    save_file(data, tmp_path / "big.safetensors")
    plan = _plan(Checkpoint([tmp_path / "big.safetensors"]), adapter, torch.float16)
    (tmp_path / "out").mkdir()
    with pytest.raises(DtypeOverflowError, match="lin0"):
        engine.write_safetensors(plan, tmp_path / "out", "model", 1 << 40)


def test_accelerator_branch_matches_cpu_rows(tmp_path, monkeypatch):
    """Any device but "cpu" takes whole tensors to the device; "cpu:0" runs that branch here, without a GPU."""
    base, adapter = _setup(tmp_path, torch.bfloat16, 2)
    plan = _plan(base, adapter, torch.bfloat16, 2)
    monkeypatch.setattr(engine, "ROW_BLOCK_BYTES", 40 * 4 * 20)
    files = {}
    for device in ("cpu", "cpu:0"):
        out = tmp_path / device.replace(":", "_")
        out.mkdir()
        files[device] = out / engine.write_safetensors(plan, out, "model", 1 << 40, device=device).files[0]
    assert files["cpu"].read_bytes() == files["cpu:0"].read_bytes()
