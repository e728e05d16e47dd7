"""Every registered adapter format runs through sniff -> read (and, where lorafuse writes it, write -> sniff -> read),
and a format registered from this file alone merges: adding a format is adding one module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.edits import FullDiff, TargetedEdit, TensorRef
from lorafuse.formats import detect_format, read_adapter, registered_formats
from lorafuse.formats.lowrank import LowRankAdapter
from lorafuse.formats.registry import AdapterFormat, ReadContext, get_format, register_format, unregister_format
from lorafuse.formats.single import adapter_keys, keys_sniffer, read_single
from lorafuse.plan import AdapterInput

MODULE = "blocks.0.attn.to_q"
# XLabs' Flux files name BFL modules only: its sample targets this one.
XLABS_MODULE = "double_blocks.0.img_attn.proj"
BASE = {
    f"{MODULE}.weight": (8, 6),
    f"{MODULE}.bias": (8,),
    "blocks.0.norm.weight": (6,),
    f"{XLABS_MODULE}.weight": (8, 6),
}


def _module(fmt: str) -> str:
    """The base module the sample of ``fmt`` changes."""
    return XLABS_MODULE if fmt == "xlabs" else MODULE


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _base(folder: Path) -> Path:
    folder.mkdir()
    g = _rng(0)
    save_file({k: g.standard_normal(s).astype(np.float32) for k, s in BASE.items()}, str(folder / "model.safetensors"))
    return folder


def _factors(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    g = _rng(seed)
    return (g.standard_normal((8, 2)) * 0.3).astype(np.float32), (g.standard_normal((2, 6)) * 0.3).astype(np.float32)


def _write(fmt: str, out: Path) -> Path:
    """A sample adapter of ``fmt`` as lorafuse writes it, or as its tools do where lorafuse does not write it."""
    up, down = _factors()
    diff = (_rng(2).standard_normal(8) * 0.1).astype(np.float32)
    spec = get_format(fmt)
    if spec.write is None:
        samples = {
            "plain": {f"{MODULE}.lora_B.weight": up, f"{MODULE}.lora_A.weight": down},
            "xlabs": {
                "double_blocks.0.processor.proj_lora1.up.weight": up,
                "double_blocks.0.processor.proj_lora1.down.weight": down,
            },
        }
        assert fmt in samples, f"add a sample for the new format {fmt!r} here"
        out = out.with_suffix(".safetensors")
        save_file(samples[fmt], str(out))
        return out
    assert spec.names is not None
    up_name, down_name, alpha_name = spec.names.lora_names(MODULE)
    tensors = {up_name: up, down_name: down}
    if alpha_name is not None:
        tensors[alpha_name] = np.array(2.0, dtype=np.float32)  # alpha == rank: scale 1
    config = None
    if fmt == "peft":
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["to_q"]}
    else:
        diff_name = spec.names.diff_name(f"{MODULE}.bias")
        assert diff_name is not None
        tensors[diff_name] = diff
        out = out.with_suffix(".safetensors")
    return spec.write(out, tensors, config)


@pytest.mark.parametrize("fmt", registered_formats())
def test_every_format_sniffs_reads_and_round_trips(tmp_path, fmt):
    base = _base(tmp_path / "base")
    shapes = {k: tuple(v.shape) for k, v in load_file(str(base / "model.safetensors")).items()}
    sample = _write(fmt, tmp_path / "sample")
    assert detect_format(sample) == fmt
    assert get_format(fmt).sniff(sample)
    others = [f for f in registered_formats() if f != fmt]
    assert not any(get_format(o).sniff(sample) for o in others if get_format(o).priority < get_format(fmt).priority)
    adapter = read_adapter(sample, base_shapes=shapes)
    assert adapter.fmt == fmt and adapter.edits
    lorafuse.merge(base, [sample], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    up, down = _factors()
    # The expected result from the factors themselves (scale 1 in every sample), never from lorafuse's reader.
    changed = f"{_module(fmt)}.weight"
    np.testing.assert_allclose(merged[changed], original[changed] + up @ down, rtol=1e-6)
    for name in original:
        if name != changed and not name.startswith(f"{MODULE}."):
            assert np.array_equal(merged[name], original[name]), name


@pytest.mark.parametrize("fmt", [f for f in registered_formats() if get_format(f).write is not None])
def test_written_formats_refuse_an_existing_output(tmp_path, fmt):
    first = _write(fmt, tmp_path / "sample")
    with pytest.raises(lorafuse.LorafuseError):
        _write(fmt, tmp_path / "sample")
    assert first.exists()


def test_unknown_format_names_the_registered_ones(tmp_path):
    with pytest.raises(lorafuse.LorafuseError, match="use one of " + ", ".join(registered_formats())):
        read_adapter(tmp_path, fmt="nope")


# A toy format, defined and registered only here: "<module>.toy_delta" holds a full difference of <module>.weight.
def _read_toy(checkpoint, label, layout, shape_of) -> LowRankAdapter:
    del layout, shape_of
    edits = [
        TargetedEdit(
            key[: -len(".toy_delta")] + ".weight", FullDiff(TensorRef(checkpoint, key), adapter=label, source_key=key)
        )
        for key in checkpoint.keys()
    ]
    return LowRankAdapter(edits)


def _toy_read(path: Path, context: ReadContext) -> AdapterInput:
    return read_single(path, context, "toy", _read_toy)


@pytest.fixture
def toy_format():
    fmt = register_format(AdapterFormat("toy", sniff=keys_sniffer(lambda k: k.endswith(".toy_delta")), read=_toy_read))
    yield fmt
    unregister_format("toy")


def test_a_format_registered_from_a_test_file_merges(tmp_path, toy_format):
    base = _base(tmp_path / "base")
    delta = (_rng(5).standard_normal((8, 6)) * 0.1).astype(np.float32)
    save_file({f"{MODULE}.toy_delta": delta}, str(tmp_path / "toy.safetensors"))
    assert "toy" in registered_formats()
    assert adapter_keys(tmp_path / "toy.safetensors") == (f"{MODULE}.toy_delta",)
    assert detect_format(tmp_path / "toy.safetensors") == "toy"
    lorafuse.merge(base, [tmp_path / "toy.safetensors"], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    np.testing.assert_allclose(merged[f"{MODULE}.weight"], original[f"{MODULE}.weight"] + delta, rtol=1e-6)
