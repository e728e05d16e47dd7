"""Tensor bytes written through a pipe (vmsplice + splice) land exactly where pwrite would put them."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
from safetensors import safe_open

from lorafuse.io.layout import Slot
from lorafuse.io.splice import SpliceWriter
from lorafuse.io.writer import array_bytes
from lorafuse.writers.safetensors import SafetensorsShardSink


def test_splice_writes_at_offset(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 12345, dtype=np.uint8)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    writer = SpliceWriter()
    try:
        writer.write(fd, array_bytes(data), 777)  # several pipe-fulls, an unaligned offset
    finally:
        writer.close()
        os.close(fd)
    raw = path.read_bytes()
    assert raw[:777] == b"\0" * 777
    assert raw[777:] == data.tobytes()


def test_shard_writer_round_trips_large_and_small_tensors_in_pieces(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "big": rng.standard_normal((700, 300)).astype(ml_dtypes.bfloat16),
        "small": rng.standard_normal(5).astype(np.float32),
    }
    slots = [Slot(k, "BF16" if v.dtype == ml_dtypes.bfloat16 else "F32", v.shape, v.nbytes) for k, v in arrays.items()]
    writer = SafetensorsShardSink(tmp_path, [slots], ["model.safetensors"])
    for slot in slots:
        data = array_bytes(arrays[slot.name])
        half = len(data) // 2  # as a kernel writes row blocks: pieces at their offsets, the second one first
        writer.write(slot, data[half:], half)
        writer.write(slot, data[:half], 0)
    writer.close()
    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as loaded:
        for name, array in arrays.items():
            assert loaded.get_tensor(name).tobytes() == array.tobytes()
