"""formats/peft_writer.py, the one writer of PEFT adapters: the same bytes as safetensors' and PEFT's own writers
(every dtype, bf16 and fp8 included), read back by safetensors and PEFT, atomic and refusing what it must."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import input_ids, load_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save

from lorafuse.errors import LorafuseError, OutputError
from lorafuse.formats.peft_writer import WEIGHTS_NAME, write_peft_adapter, write_safetensors
from lorafuse.torch_bridge import to_numpy

TORCH_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
    torch.int16,
    torch.uint16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.uint32,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.uint64,
]


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors and lorafuse share, two names each, inserted in no sorted order; a 0-d and an empty
    tensor too."""
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(reversed(TORCH_DTYPES)):
        for name in (f"z.{i}", f"a.{i}"):
            values = torch.randn(3, 5, generator=gen) * 4
            tensors[name] = values.to(dtype) if dtype.is_floating_point else (values.abs() * 7).to(dtype)
    tensors["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 4)
    return tensors


def test_bytes_equal_safetensors_own_serializer(tmp_path):
    tensors = _mixed_tensors()
    arrays = {name: to_numpy(t) for name, t in tensors.items()}
    write_safetensors(tmp_path / "ours.safetensors", arrays)
    assert (tmp_path / "ours.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})
    # The caller's order does not matter: the same tensors always give the same file.
    write_safetensors(tmp_path / "reversed.safetensors", dict(reversed(arrays.items())))
    assert (tmp_path / "reversed.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


def test_round_trip_through_safe_open_with_views_and_memory_maps(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    spool = tmp_path / "spool.bin"
    base.astype(ml_dtypes.bfloat16).tofile(spool)
    arrays = {
        "strided": base[:, ::2],  # not contiguous: copied
        "bf16_memmap": np.memmap(spool, dtype=ml_dtypes.bfloat16, mode="r", shape=(6, 8)),  # as extract's spool
        "fp8": base.astype(ml_dtypes.float8_e4m3fn),
    }
    write_safetensors(tmp_path / "t.safetensors", arrays)
    with safe_open(tmp_path / "t.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name, array in arrays.items():
            got = to_numpy(handle.get_tensor(name))
            assert got.dtype == array.dtype and got.shape == array.shape
            assert np.array_equal(got.astype(np.float32), np.asarray(array).astype(np.float32))
    with safe_open(tmp_path / "t.safetensors", framework="np") as handle:
        np.testing.assert_array_equal(handle.get_tensor("strided"), base[:, ::2])


def _bf16_peft_adapter(model_dir: Path, folder: Path) -> PeftModel:
    """PEFT's own bf16 adapter (no autocast to fp32), with every LoRA tensor non-zero."""
    model = load_model(model_dir).to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False)
    peft = get_peft_model(model, config, autocast_adapter_dtype=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft.save_pretrained(folder)
    return peft


def test_same_file_as_peft_save_pretrained_and_loads_in_peft(llama_untied, tmp_path):
    peft = _bf16_peft_adapter(llama_untied, tmp_path / "peft")
    with safe_open(tmp_path / "peft" / WEIGHTS_NAME, framework="pt") as handle:
        arrays = {key: to_numpy(handle.get_tensor(key)) for key in reversed(list(handle.keys()))}
    assert {a.dtype for a in arrays.values()} == {np.dtype(ml_dtypes.bfloat16)}
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    write_peft_adapter(tmp_path / "ours", arrays, config)
    assert (tmp_path / "ours" / WEIGHTS_NAME).read_bytes() == (tmp_path / "peft" / WEIGHTS_NAME).read_bytes()
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == config
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json", WEIGHTS_NAME]
    base = load_model(llama_untied).to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, tmp_path / "ours", autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids()).logits, peft.eval()(input_ids()).logits)


def test_refuses_a_used_output_an_input_and_unknown_dtypes(tmp_path):
    tensors = {"base_model.model.x.lora_A.weight": np.ones((2, 3), np.float32)}
    config = {"peft_type": "LORA", "r": 2}
    out = write_peft_adapter(tmp_path / "out", tensors, config)
    with pytest.raises(OutputError, match="--overwrite"):
        write_peft_adapter(out, tensors, config)
    write_peft_adapter(out, tensors, {**config, "r": 3}, overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    with pytest.raises(OutputError, match="lies inside the input"):
        write_peft_adapter(out / "inner", tensors, config, inputs=[out])
    with pytest.raises(LorafuseError, match="tensor 'c': safetensors has no dtype <c8"):
        write_peft_adapter(tmp_path / "bad", {**tensors, "c": np.zeros(2, np.complex64)}, config)
    with pytest.raises(LorafuseError, match="tensor 'big': safetensors has no dtype >f4"):  # never silently swapped
        write_peft_adapter(tmp_path / "bad", {**tensors, "big": np.zeros(2, ">f4")}, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left behind
