"""Tensor bytes written through a pipe (vmsplice + splice) land exactly where pwrite would put them."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from lorafuse.io.splice import SpliceWriter
from lorafuse.io.writer import SafetensorsShardWriter, Slot, tensor_bytes


def test_splice_writes_at_offset(tmp_path):
    data = torch.randint(
        0, 256, (3 * (1 << 20) + 12345,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    writer = SpliceWriter()
    try:
        writer.write(fd, tensor_bytes(data), 777)  # several pipe-fulls, an unaligned offset
    finally:
        writer.close()
        os.close(fd)
    raw = path.read_bytes()
    assert raw[:777] == b"\0" * 777
    assert raw[777:] == data.numpy().tobytes()


def test_shard_writer_round_trips_large_and_small_tensors(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {"big": torch.randn(700, 300, generator=gen).bfloat16(), "small": torch.randn(5, generator=gen)}
    slots = [Slot(k, v.dtype, tuple(v.shape), v.numel() * v.element_size()) for k, v in tensors.items()]
    writer = SafetensorsShardWriter(tmp_path, [slots], ["model.safetensors"])
    for slot in slots:
        writer.write_bytes(slot, tensor_bytes(tensors[slot.name]))
    writer.close()
    loaded = load_file(tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
