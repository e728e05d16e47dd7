"""``lorafuse merge ... --format gguf`` writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for the PEFT-merged
model: the same keys and values (hyperparameters, general metadata, tokenizer) and the same tensors (names, types,
shapes, bytes), plus lorafuse's provenance key.

The oracle is the real converter (tests/gguf_oracle.py fetches it from the package registry once), run on the
model PEFT's ``merge_and_unload`` saved, with the base's tokenizer beside it (as a user would convert it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from hashlib import sha256

import gguf  # the gguf extra is part of the test extra: a missing one fails, never skips
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf_oracle import (
    add_bpe_tokenizer,
    add_sentencepiece_tokenizer,
    copy_tokenizer,
    dequantized,
    read_gguf,
    run_converter,
)
from helpers import _randomize, make_peft_adapter, peft_merged

import lorafuse
from lorafuse import gguf_pretokenizers
from lorafuse.errors import LorafuseError
from lorafuse.writers.gguf import PROVENANCE_KEY

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEST_PRE = "qwen2"  # the pre-tokenizer recorded for a test-built BPE tokenizer (whose check hash is new)


def make_model(root, model_type: str, tokenizer: str, dtype=torch.float32, tie: bool = False, **config):
    """A 2-layer ``model_type`` causal LM with a tokenizer trained in the test, in ``root/tiny-<model_type>``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = root / f"tiny-{model_type}"
    folder.mkdir(parents=True)
    size = add_bpe_tokenizer(folder) if tokenizer == "bpe" else add_sentencepiece_tokenizer(folder)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=size + 4,  # a few ids without a token: written as [PAD<i>]
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        **{**shape, **config},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    _randomize(model, 0)
    model.to(dtype).save_pretrained(folder)
    return folder


def known_pre_tokenizer(folder, monkeypatch) -> None:
    """Tell lorafuse the test tokenizer's check hash, as the converter is told (gguf_oracle.WRAPPER)."""
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(folder).encode(gguf_pretokenizers.CHECK_TEXT)
    digest = sha256(str(tokens).encode()).hexdigest()
    monkeypatch.setitem(gguf_pretokenizers.PRE_TOKENIZERS, digest, TEST_PRE)


def reference_gguf(base, adapter, tmp_path, outtype: str, dtype=torch.float32):
    """llama.cpp's conversion of PEFT's merge (saved in a folder of the base's name: general.name comes from it)."""
    merged = tmp_path / "peft" / base.name
    peft_merged(base, [adapter], dtype=dtype).to(dtype).save_pretrained(merged)
    copy_tokenizer(base, merged)
    out = tmp_path / f"reference-{outtype}.gguf"
    run_converter("convert_hf_to_gguf.py", [str(merged), "--outfile", str(out), "--outtype", outtype], pre=TEST_PRE)
    return out


def tolerance(qtype) -> float:
    """How far one merged value may be from PEFT's after conversion: their fp32 merges differ in the last bits
    (summation order), which one rounding to the output type can turn into one step of it."""
    kinds = gguf.GGMLQuantizationType
    return {kinds.F32: 1e-5, kinds.F16: 2**-10, kinds.BF16: 2**-7}.get(qtype, 2**-6)


def assert_same_gguf(ours, reference) -> None:
    our_fields, our_tensors = read_gguf(ours)
    ref_fields, ref_tensors = read_gguf(reference)
    assert set(our_fields) - {PROVENANCE_KEY} == set(ref_fields)
    for key, value in ref_fields.items():
        assert our_fields[key] == value, key
    assert list(our_tensors) == list(ref_tensors)  # same names, same order
    exact = 0
    for name, ref in ref_tensors.items():
        mine = our_tensors[name]
        assert (mine.tensor_type, list(mine.shape)) == (ref.tensor_type, list(ref.shape)), name
        if np.array_equal(np.asarray(mine.data), np.asarray(ref.data)):
            exact += 1
            continue
        want, got = dequantized(ref), dequantized(mine)
        scale = float(np.abs(want).max()) or 1.0
        assert float(np.abs(got - want).max()) <= tolerance(ref.tensor_type) * scale, name
    assert exact >= len(ref_tensors) // 2  # untouched tensors (norms, embeddings) and most merged ones: bytes equal
    provenance = json.loads(our_fields[PROVENANCE_KEY])
    assert provenance["adapters"][0]["files"]


LLAMA3_ROPE = {  # wavelengths on both sides of 64/4 and 64/1 positions: every branch of the factor formula
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    # (model_type, tokenizer, base dtype, outtype, extra config)
    "qwen3-bpe-f32": ("qwen3", "bpe", torch.float32, "f32", dict(head_dim=16)),
    "qwen3-bpe-q8_0": ("qwen3", "bpe", torch.float32, "q8_0", dict(head_dim=16)),
    "qwen3-tied-bpe-f16": ("qwen3", "bpe", torch.bfloat16, "f16", dict(head_dim=16, tie=True)),
    "llama-spm-f16": ("llama", "spm", torch.float32, "f16", {}),
    "llama-spm-q8_0-bf16-base": ("llama", "spm", torch.bfloat16, "q8_0", {}),
    "qwen2-bpe-bf16": ("qwen2", "bpe", torch.bfloat16, "bf16", {}),
    "llama3-rope-spm-q8_0": ("llama", "spm", torch.bfloat16, "q8_0", dict(rope_parameters=LLAMA3_ROPE)),
    "mistral-spm-f16": ("mistral", "spm", torch.float16, "f16", {}),
    "gemma2-spm-f32": ("gemma2", "spm", torch.float32, "f32", dict(head_dim=16)),
    "gemma2-spm-q8_0-bf16-base": ("gemma2", "spm", torch.bfloat16, "q8_0", dict(head_dim=16)),
    "gemma2-spm-f16-f16-base": ("gemma2", "spm", torch.float16, "f16", dict(head_dim=16)),
    "gemma3-spm-f32": ("gemma3_text", "spm", torch.float32, "f32", dict(head_dim=16)),
    "gemma3-bpe-bf16": ("gemma3_text", "bpe", torch.bfloat16, "bf16", dict(head_dim=16)),  # embedding cut to 303
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_equals_llama_cpp_conversion_of_peft_merge(case, tmp_path, monkeypatch):
    model_type, tokenizer, dtype, outtype, config = CASES[case]
    config = dict(config)
    base = make_model(tmp_path / "base", model_type, tokenizer, dtype, tie=config.pop("tie", False), **config)
    if tokenizer == "bpe":
        known_pre_tokenizer(base, monkeypatch)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=ALL_LINEAR, dtype=dtype)
    ours = tmp_path / "merged.gguf"
    report = lorafuse.merge(base, [adapter], ours, out_format="gguf", outtype=outtype)
    assert report.files == ["merged.gguf"] and report.tensors_touched == 14
    reference = reference_gguf(base, adapter, tmp_path, outtype, dtype)
    assert_same_gguf(ours, reference)
    if "rope_parameters" in config:  # llama3 rope: the generated tensor, bit for bit the converter's
        factors = np.asarray(read_gguf(ours)[1]["rope_freqs.weight"].data)
        assert np.array_equal(
            factors.view(np.uint32), np.asarray(read_gguf(reference)[1]["rope_freqs.weight"].data).view(np.uint32)
        )
        assert factors.shape == (8,) and factors.min() == 1.0 and factors.max() == 8.0
        assert ((factors > 1) & (factors < 8)).any()  # the smooth blend too


def test_outtype_auto_follows_the_base_dtype(tmp_path, monkeypatch):
    base = make_model(tmp_path / "base", "qwen3", "bpe", torch.bfloat16, head_dim=16)
    known_pre_tokenizer(base, monkeypatch)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], dtype=torch.bfloat16)
    out = tmp_path / "m.gguf"
    lorafuse.merge(base, [adapter], out, out_format="gguf")
    fields, tensors = read_gguf(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16


def test_unknown_bpe_pre_tokenizer_is_refused_as_llama_cpp_does(tmp_path):
    base = make_model(tmp_path / "base", "qwen3", "bpe", head_dim=16)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(LorafuseError, match="pre-tokenizer .* not one llama.cpp knows"):
        lorafuse.merge(base, [adapter], tmp_path / "m.gguf", out_format="gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architecture_is_one_line_before_any_work(gpt2, tmp_path):
    adapter = make_peft_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn"])
    with pytest.raises(LorafuseError, match="cannot write architecture GPT2LMHeadModel as GGUF"):
        lorafuse.merge(gpt2, [adapter], tmp_path / "m.gguf", out_format="gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    ("out", "outtype", "message"),
    [("m.safetensors", "f16", "ending in .gguf"), ("m.gguf", "q4_k_m", "unknown --outtype 'q4_k_m'.*llama-quantize")],
)
def test_bad_gguf_requests_are_one_line(llama_untied, tmp_path, out, outtype, message):
    with pytest.raises(LorafuseError, match=message):
        lorafuse.merge(llama_untied, [tmp_path / "missing"], tmp_path / out, out_format="gguf", outtype=outtype)


def test_cli_writes_gguf(tmp_path, monkeypatch):
    base = make_model(tmp_path / "base", "llama", "spm")
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj"])
    out = tmp_path / "cli.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafuse", "merge", str(base), str(adapter), "-o", str(out), "--format", "gguf",
         "--outtype", "q8_0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _, tensors = read_gguf(out)
    assert tensors["blk.1.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_fast_f16_cast_rounds_as_numpy_does():
    """writers/gguf.to_f16 (ml_dtypes' casts) gives numpy's bits: random finite fp32 patterns,
    f16 subnormals, ties and overflow."""
    from lorafuse.writers.gguf import to_f16

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([65504, 65519.99, 65520, 2.0**-24, 2.0**-25, 3 * 2.0**-26, -0.0, 1 + 2.0**-11], np.float32)
    values = np.concatenate(
        [patterns[np.isfinite(patterns)], rng.standard_normal(100_000).astype(np.float32) * 1e-5, edges]
    )
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    assert np.array_equal(to_f16(values.copy()).view(np.uint16), want.view(np.uint16))
    # every bfloat16 (NaNs stay NaN, their payload aside), read-only as the kernel may hand them
    every = np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16)
    every.flags.writeable = False
    with np.errstate(all="ignore"):
        want = every.astype(np.float32).astype(np.float16)
    got, nan = to_f16(every), np.isnan(want)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan]) and np.isnan(got[nan]).all()


def test_merge_into_a_tensor_llama_cpp_drops_is_refused(tmp_path):
    base = make_model(tmp_path / "base", "gemma2", "spm", head_dim=16, tie=False)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["lm_head"])
    with pytest.raises(LorafuseError, match="change lm_head.weight, which llama.cpp's gemma2 does not have"):
        lorafuse.merge(base, [adapter], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


PHI3_LINEAR = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "long_factor": [1.0 + i / 4 for i in range(8)],  # head_dim 16: 8 rotary pairs
    "short_factor": [1.0 + i / 16 for i in range(8)],
    "original_max_position_embeddings": 64,
}
PHI3_CASES = {
    # (tokenizer, base dtype, outtype, extra config); Phi-3's own SentencePiece reader, or BPE for GPT2Tokenizer
    "spm-f16": ("spm", torch.float32, "f16", {}),
    "spm-q8_0-bf16-base-longrope": ("spm", torch.bfloat16, "q8_0", dict(rope_parameters=LONGROPE)),
    "bpe-gpt2tokenizer-f32": ("bpe", torch.float32, "f32", dict(sliding_window=64)),
}


@pytest.mark.parametrize("case", list(PHI3_CASES))
def test_phi3_gguf_equals_llama_cpp_conversion_of_peft_merge(case, tmp_path, monkeypatch):
    tokenizer, dtype, outtype, config = PHI3_CASES[case]
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Phi-3's defaults (32000) are past a tiny vocabulary
    base = make_model(tmp_path / "base", "phi3", tokenizer, dtype, **ids, **config)
    if tokenizer == "bpe":  # Phi-4's tokenizer class: the converter reads it as BPE
        settings = json.loads((base / "tokenizer_config.json").read_text())
        (base / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "GPT2Tokenizer"}))
        known_pre_tokenizer(base, monkeypatch)
    else:  # added tokens in both places the Phi-3 reader looks (one special, one not)
        settings = json.loads((base / "tokenizer_config.json").read_text())
        settings["added_tokens_decoder"] = {
            "3": {"content": "<|user|>", "special": True}, "4": {"content": "\u2581x", "special": False},
        }  # fmt: skip
        (base / "tokenizer_config.json").write_text(json.dumps(settings))
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=PHI3_LINEAR, dtype=dtype)
    ours = tmp_path / "merged.gguf"
    report = lorafuse.merge(base, [adapter], ours, out_format="gguf", outtype=outtype)
    assert report.tensors_touched == 8
    reference = reference_gguf(base, adapter, tmp_path, outtype, dtype)
    assert_same_gguf(ours, reference)
    fields, tensors = read_gguf(ours)
    if "rope_parameters" in config:  # the generated tensors and key are there, bit for bit the converter's
        assert list(tensors)[:2] == ["rope_factors_long.weight", "rope_factors_short.weight"]
        _, ref_tensors = read_gguf(reference)
        for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
            assert np.asarray(tensors[name].data).tobytes() == np.asarray(ref_tensors[name].data).tobytes(), name
        assert np.array_equal(np.asarray(tensors["rope_factors_long.weight"].data), LONGROPE["long_factor"])
        assert "phi3.rope.scaling.attn_factor" in fields


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_config_read_in_a_child_equals_transformers_in_process(model_type, tmp_path):
    """gguf_header's child process (transformers without torch, JSON back) gives the dict the converter reads."""
    from transformers import AutoConfig

    from lorafuse.gguf_header import hparams_child, hparams_from_child

    folder = tmp_path / model_type
    extra = {"rope_parameters": LLAMA3_ROPE} if model_type == "llama" else {}
    AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2, **extra).save_pretrained(folder)
    child = hparams_child(folder)
    assert child is not None
    assert hparams_from_child(child, folder) == AutoConfig.from_pretrained(folder, trust_remote_code=False).to_dict()
