"""Every registered output writer round-trips: the bytes the kernel hands it (row blocks at offsets, file-to-file
copies), read back through the safetensors library or ``torch.load(weights_only=True)``, equal the tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lorafuse.arrays import code_of
from lorafuse.errors import LorafuseError
from lorafuse.io.layout import Slot
from lorafuse.io.writer import array_bytes
from lorafuse.writers import ModelWriter, get_writer, output_formats, register_writer


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((64, 48)).astype(ml_dtypes.bfloat16),
        "b.weight": rng.standard_normal((300, 40)).astype(np.float32),
        "c.bias": rng.standard_normal(7).astype(np.float16),
        "d.ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "e.empty": np.zeros((0, 5), dtype=np.float32),
    }


def _slots(tensors: dict[str, np.ndarray]) -> list[Slot]:
    return [Slot(n, code_of(t.dtype), tuple(t.shape), t.nbytes) for n, t in tensors.items()]


def _write(writer: ModelWriter, folder: Path, tensors: dict[str, np.ndarray], max_shard: int, single=None) -> list:
    """Write as the kernel does: row blocks out of order for some tensors, a file-to-file copy for another."""
    source = folder.parent / "source.bin"
    source.write_bytes(b"\0" * 3 + bytes(array_bytes(tensors["b.weight"])))
    layout = writer.layout(_slots(tensors), "model", max_shard, single)
    sink = writer.open(folder, layout, {"note": "x"} if single else None)
    slots = {s.name: s for s in layout.slots}
    fd = os.open(source, os.O_RDONLY)
    try:
        for name, tensor in tensors.items():
            data = array_bytes(tensor)
            if name == "b.weight":
                sink.copy(slots[name], fd, 3)
                continue
            half = len(data) // 2
            sink.write(slots[name], data[half:], half)  # second half first: writes land at their offset
            sink.write(slots[name], data[:half], 0)
    finally:
        os.close(fd)
        sink.close()
    writer.finish(folder, layout)
    return layout.files


def _read(folder: Path, files: list[str]) -> dict[str, np.ndarray]:
    import torch

    from lorafuse.torch_bridge import to_numpy

    got: dict[str, np.ndarray] = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(folder / name, "np") as handle:
                got.update({k: handle.get_tensor(k) for k in handle.keys()})
        elif name.endswith(".bin"):
            got.update({k: to_numpy(v) for k, v in torch.load(folder / name, weights_only=True).items()})
    return got


def _assert_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert got[name].tobytes() == tensor.tobytes(), name


# The formats that hold any tensors under their names; GGUF is a model conversion (a config and a tokenizer, llama.cpp's
# names), tested against llama.cpp in tests/test_gguf_*.py.
CONTAINERS = [f for f in output_formats() if f != "gguf"]


def test_registry_lists_the_built_in_formats_without_importing_torch():
    code = "import sys; from lorafuse.writers import output_formats as f; print(*f()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].split() == ["safetensors", "bin", "gguf"] and out[1] == "False"
    assert output_formats()[0] == "safetensors"


def test_unknown_format_is_a_one_line_error():
    with pytest.raises(LorafuseError, match="unknown output format 'onnx': use safetensors or bin or gguf"):
        get_writer("onnx")


def test_a_name_registers_once():
    class Other(ModelWriter):
        name = "safetensors"
        suffix = ".x"

        def open(self, folder, layout, metadata=None, prefill=None):
            raise NotImplementedError

    with pytest.raises(ValueError, match="registered twice"):
        register_writer(Other)


@pytest.mark.parametrize("fmt", CONTAINERS)
@pytest.mark.parametrize("max_shard", [1 << 40, 4000])
def test_sharded_round_trip(fmt, max_shard, tmp_path):
    tensors = _tensors()
    folder = tmp_path / "out"
    folder.mkdir()
    files = _write(get_writer(fmt), folder, tensors, max_shard)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    _assert_equal(_read(folder, files), tensors)
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    if max_shard == 1 << 40:
        assert files == [f"{prefix}.{fmt}"]
        return
    shards = [f for f in files if not f.endswith(".json")]
    assert len(shards) > 1 and files[-1] == f"{prefix}.{fmt}.index.json"
    index = json.loads((folder / files[-1]).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for name, shard in index["weight_map"].items():
        assert name in _read(folder, [shard])


@pytest.mark.parametrize("fmt", CONTAINERS)
def test_single_file_round_trip(fmt, tmp_path):
    tensors = _tensors()
    folder = tmp_path / "out"
    folder.mkdir()
    files = _write(get_writer(fmt), folder, tensors, 4000, single=f"one.{fmt}")
    assert files == [f"one.{fmt}"]
    _assert_equal(_read(folder, files), tensors)
    if fmt == "safetensors":
        with safe_open(folder / files[0], "np") as handle:
            assert handle.metadata() == {"format": "pt", "note": "x"}


def test_safetensors_output_is_what_the_library_writes(tmp_path):
    """Same header layout and bytes as safetensors' own writer for the same tensors in the same order."""
    tensors = {k: v for k, v in _tensors().items() if k != "e.empty"}
    folder = tmp_path / "out"
    folder.mkdir()
    _write(get_writer("safetensors"), folder, tensors, 1 << 40)
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    with safe_open(tmp_path / "lib.safetensors", "np") as lib, safe_open(folder / "model.safetensors", "np") as ours:
        assert lib.metadata() == ours.metadata()
        for name in tensors:
            assert lib.get_tensor(name).tobytes() == ours.get_tensor(name).tobytes()


def test_bin_without_torch_is_a_one_line_error(monkeypatch):
    import lorafuse.torch_bridge as bridge

    def missing(what: str) -> None:
        raise LorafuseError(f"{what} needs torch: pip install 'lorafuse[torch]'")

    monkeypatch.setattr(bridge, "require_torch", missing)
    with pytest.raises(LorafuseError, match=r"^--format bin .*lorafuse\[torch\]"):
        get_writer("bin").check_available()
