"""``lorafuse convert ADAPTER --to gguf`` writes what llama.cpp's ``convert_lora_to_gguf.py`` writes for the same
PEFT adapter and base config: every key and value, every tensor byte for byte. Adapters whose PEFT scaling
llama.cpp would compute differently are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_oracle import read_gguf, run_converter
from helpers import make_peft_adapter
from test_gguf_merge import make_model

from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.gguf_lora import convert_lora

CASES = {
    # (model_type, LoraConfig kwargs, outtype, adapter dtype)
    "llama-qk-f32": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]), "f32", torch.float32),
    "llama-rank32-q8_0": (
        "llama",
        dict(target_modules=["q_proj", "k_proj"], r=32, lora_alpha=16),
        "q8_0",
        torch.float32,
    ),
    "qwen3-f16-from-bf16": ("qwen3", dict(target_modules=["q_proj", "o_proj", "up_proj"]), "f16", torch.bfloat16),
    "llama-embedding-bf16": ("llama", dict(target_modules=["embed_tokens", "q_proj"]), "bf16", torch.float32),
    "gemma2-f16": ("gemma2", dict(target_modules=["q_proj", "k_proj", "gate_proj"]), "f16", torch.float32),
    "llama-rank-pattern": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
        "q8_0",  # rows of 2 or 4 values: F16, as the converter falls back
        torch.float32,
    ),
}


def assert_same_file(ours, reference) -> None:
    our_fields, our_tensors = read_gguf(ours)
    ref_fields, ref_tensors = read_gguf(reference)
    assert our_fields == ref_fields
    assert list(our_tensors) == list(ref_tensors)
    for name, ref in ref_tensors.items():
        mine = our_tensors[name]
        assert (mine.tensor_type, list(mine.shape)) == (ref.tensor_type, list(ref.shape)), name
        assert np.array_equal(np.asarray(mine.data), np.asarray(ref.data)), name


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_lora_equals_llama_cpp_conversion(case, tmp_path):
    model_type, lora_kwargs, outtype, dtype = CASES[case]
    extra = dict(head_dim=16) if model_type in ("qwen3", "gemma2") else {}
    base = make_model(tmp_path / "base", model_type, "spm", dtype, **extra)
    adapter = make_peft_adapter(base, tmp_path / "adapter", dtype=dtype, **lora_kwargs)
    reference = tmp_path / "reference.gguf"
    args = ["--base", str(base), "--outfile", str(reference), "--outtype", outtype, str(adapter)]
    run_converter("convert_lora_to_gguf.py", args)
    ours = tmp_path / "ours.gguf"
    result = convert_lora(adapter, base, ours, outtype)
    assert result.tensors == len(read_gguf(ours)[1])
    assert_same_file(ours, reference)


def test_cli_convert(tmp_path, capsys):
    base = make_model(tmp_path / "base", "llama", "spm")
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "a.gguf"
    assert main(["convert", str(adapter), "--to", "gguf", "--base", str(base), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    fields, tensors = read_gguf(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert set(tensors) == {f"blk.{i}.attn_q.weight.lora_{p}" for i in (0, 1) for p in "ab"}
    assert main(["convert", str(adapter), "--to", "gguf", "--base", str(base), "-o", str(out)]) == 1  # exists


@pytest.mark.parametrize(
    ("lora_kwargs", "reason"),
    [
        (dict(use_rslora=True), "rsLoRA"),
        (dict(use_dora=True), "DoRA"),
        (dict(alpha_pattern={"v_proj": 3}), "alpha_pattern"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_lora_llama_cpp_would_scale_differently_is_refused(lora_kwargs, reason, llama_untied, tmp_path):
    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], **lora_kwargs)
    with pytest.raises(LorafuseError, match=f"{reason}.*lorafuse merge"):
        convert_lora(adapter, llama_untied, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_unsupported_base_architecture_is_refused(gpt2, tmp_path):
    adapter = make_peft_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn"])
    with pytest.raises(LorafuseError, match="GPT2LMHeadModel"):
        convert_lora(adapter, gpt2, tmp_path / "a.gguf")


def test_lora_on_a_head_llama_cpp_ties_is_refused(tmp_path):
    base = make_model(tmp_path / "base", "gemma2", "spm", head_dim=16, tie=False)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    with pytest.raises(LorafuseError, match="no tensor for lm_head.weight"):
        convert_lora(adapter, base, tmp_path / "a.gguf")
