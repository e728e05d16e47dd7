"""``lorafuse merge model.gguf ADAPTER -o merged.gguf``: a PEFT adapter merged into a GGUF that llama.cpp's
converter made. Keys and untouched tensors stay byte for byte; merged tensors equal llama.cpp's conversion of
PEFT's merge (exactly from f32, within the type's own step from a quantized base); types gguf-py cannot write
(K-quants) become ``--requant`` with a warning."""

from __future__ import annotations

import gguf  # the gguf extra is part of the test extra: a missing one fails, never skips
import numpy as np
import pytest
import torch
from gguf_oracle import dequantized, read_gguf, run_converter
from helpers import make_peft_adapter, peft_merged, read_tensors
from test_gguf_merge import LONGROPE, known_pre_tokenizer, make_model, reference_gguf

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError
from lorafuse.io.gguf_checkpoint import GGUFCheckpoint
from lorafuse.verify import verify
from lorafuse.writers.gguf import PROVENANCE_KEY

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def converted(base, tmp_path, outtype: str):
    out = tmp_path / f"base-{outtype}.gguf"
    run_converter("convert_hf_to_gguf.py", [str(base), "--outfile", str(out), "--outtype", outtype])
    return out


PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # fused: llama.cpp's attn_qkv and ffn_up
PHI3_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Phi-3's defaults are past a tiny vocabulary
BASES = {
    # model_type -> (extra config, target modules)
    "llama": ({}, TARGETS),
    "qwen3": (dict(head_dim=16), TARGETS),
    "gemma2": (dict(head_dim=16), TARGETS),  # norms stored as 1 + weight, head dropped (tied)
    "gemma3_text": (dict(head_dim=16), TARGETS),
    "phi3": (PHI3_IDS, PHI3_TARGETS),
    "phi3-longrope": ({**PHI3_IDS, "rope_parameters": LONGROPE}, PHI3_TARGETS),  # + rope_factors_long/short
}


def make_base(root, case: str):
    config, targets = BASES[case]
    return make_model(root, case.split("-")[0], "spm", **config), targets


@pytest.mark.parametrize(
    ("case", "outtype"),
    [
        ("llama", "f32"),
        ("qwen3", "q8_0"),
        ("llama", "q8_0"),
        ("gemma2", "f32"),
        ("gemma2", "q8_0"),
        ("gemma3_text", "f32"),
        ("gemma3_text", "q8_0"),
        ("phi3", "f32"),
        ("phi3-longrope", "q8_0"),
    ],
)
def test_merge_into_gguf_equals_conversion_of_peft_merge(case, outtype, tmp_path):
    base, targets = make_base(tmp_path / "hf", case)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=targets)
    base_gguf = converted(base, tmp_path, outtype)
    out = tmp_path / "merged.gguf"
    report = lorafuse.merge(base_gguf, [adapter], out)  # .gguf output: GGUF written
    assert report.tensors_touched == 8 and report.warnings == []

    fields, tensors = read_gguf(out)
    base_fields, base_tensors = read_gguf(base_gguf)
    assert {k: v for k, v in fields.items() if k != PROVENANCE_KEY} == base_fields  # metadata kept
    ref_fields, ref_tensors = read_gguf(reference_gguf(base, adapter, tmp_path, outtype))
    assert list(tensors) == list(ref_tensors)
    step = 1.5 / 127  # q8_0 from a q8_0 base: one quantization step of the block, and a margin
    for name, ref in ref_tensors.items():
        mine = tensors[name]
        assert mine.tensor_type == base_tensors[name].tensor_type, name
        untouched = np.array_equal(np.asarray(ref.data), np.asarray(base_tensors[name].data))
        if untouched or outtype == "f32":  # left alone, or merged from float32 values: the converter's bytes
            assert np.array_equal(np.asarray(mine.data), np.asarray(ref.data)), name
            continue
        want, got = dequantized(ref), dequantized(mine)
        assert np.abs(got - want).max() <= step * np.abs(want).max(), name


def test_merged_gemma_norm_gets_the_converters_shift_back(tmp_path):
    """A norm the adapter replaces (modules_to_save) is written as 1 + weight, as the converter writes PEFT's merge;
    the untouched norms keep their bytes."""
    base, _ = make_base(tmp_path / "hf", "gemma3_text")
    adapter = make_peft_adapter(
        base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["post_feedforward_layernorm"]
    )
    source, out = converted(base, tmp_path, "f32"), tmp_path / "merged.gguf"
    report = lorafuse.merge(source, [adapter], out)
    assert report.tensors_touched == 4
    checked = verify(out, source, [adapter])  # the merged norms compared as stored, shifted
    assert checked.passed and checked.tensors_touched == 4, checked.failures
    _, tensors = read_gguf(out)
    _, ref_tensors = read_gguf(reference_gguf(base, adapter, tmp_path, "f32"))
    assert list(tensors) == list(ref_tensors)
    for name, ref in ref_tensors.items():
        assert np.array_equal(np.asarray(tensors[name].data), np.asarray(ref.data)), name
    norm = np.asarray(tensors["blk.1.post_ffw_norm.weight"].data)
    assert np.abs(norm - 1).max() < 0.9  # near 1: shifted (the trained copy is a small random weight)


@pytest.mark.parametrize(
    ("model_type", "tokenizer", "dtype"),
    [
        ("gemma2", "spm", torch.float16),
        ("gemma2", "spm", torch.bfloat16),
        ("gemma3_text", "bpe", torch.bfloat16),  # the GGUF's embedding cut to the tokenizer's rows
    ],
)
def test_verify_passes_a_gemma_merge_from_a_model_folder(model_type, tokenizer, dtype, tmp_path, monkeypatch):
    """A Gemma GGUF reads back (norms shifted as the writer shifts them, in the stored precision for float16), so
    verify checks it; a wrong weight fails it."""
    base = make_model(tmp_path / "hf", model_type, tokenizer, dtype, head_dim=16)
    if tokenizer == "bpe":
        known_pre_tokenizer(base, monkeypatch)
    adapter = make_peft_adapter(
        base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["input_layernorm"], dtype=dtype
    )
    out = tmp_path / "m.gguf"
    lorafuse.merge(base, [adapter], out, outtype="f16")
    report = verify(out, base, [adapter])
    assert report.passed and report.tensors_touched == 4, report.failures
    assert not verify(out, base, [adapter], weights=[0.5]).passed
    rows = GGUFCheckpoint(out).raw("model.embed_tokens.weight").shape[0]
    assert (rows < read_tensors(base)["model.embed_tokens.weight"].shape[0]) == (tokenizer == "bpe")


def q4_k_gguf(source, out, seed: int = 0):
    """``source`` (an f32 GGUF) with every 2-D weight whose rows are whole 256-value blocks rewritten as Q4_K (random
    but finite blocks): a K-quant base, which gguf-py can read but not write."""
    rng = np.random.default_rng(seed)
    fields, tensors = read_gguf(source)
    base = GGUFCheckpoint(source)
    writer = gguf.GGUFWriter(out, arch=fields["general.architecture"])
    from lorafuse.gguf_header import field_value

    for name, field in base.fields.items():
        if name != "general.architecture":
            value, kind, item = field_value(field)
            writer.add_key_value(name, value, kind, sub_type=item)
    kinds = {}
    for name, t in tensors.items():
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if len(shape) == 2 and shape[1] % 256 == 0 and name.endswith(".weight"):
            blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // 256, 144), dtype=np.uint8)
            blocks[:, 0:4] = np.array([0.002, 0.001], dtype=np.float16).view(np.uint8)  # d and dmin
            data = blocks.reshape(shape[0], shape[1] // 256 * 144)
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
            kinds[name] = "Q4_K"
        else:
            writer.add_tensor(name, np.asarray(t.data).copy(), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kinds


def test_k_quant_base_requantizes_merged_tensors_and_copies_the_rest(tmp_path):
    base = make_model(tmp_path / "hf", "llama", "spm", hidden_size=256, intermediate_size=512)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "up_proj"])
    source = tmp_path / "base.gguf"
    kinds = q4_k_gguf(converted(base, tmp_path, "f32"), source)
    assert "blk.0.attn_q.weight" in kinds
    out = tmp_path / "merged.gguf"
    report = lorafuse.merge(source, [adapter], out, requant="q8_0")
    assert any("Q4_K" in w and "Q8_0" in w for w in report.warnings)

    _, tensors = read_gguf(out)
    _, base_tensors = read_gguf(source)
    merged = {"attn_q", "attn_k", "ffn_up"}
    for name, t in tensors.items():
        if name.split(".")[-2] in merged and name.startswith("blk."):
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        else:  # untouched: byte for byte, K-quants included
            assert t.tensor_type == base_tensors[name].tensor_type, name
            assert np.array_equal(np.asarray(t.data), np.asarray(base_tensors[name].data)), name

    # In transformers' row order: the K-quant values plus PEFT's update, within q8_0's step.
    peft = {k: v.float().numpy() for k, v in peft_merged(base, [adapter]).state_dict().items()}
    hf = {k: v.float().numpy() for k, v in read_tensors(base).items()}
    before, after = GGUFCheckpoint(source), GGUFCheckpoint(out)
    for i in range(2):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
            key = f"model.layers.{i}.{module}.weight"
            want = before.array(key) + (peft[key] - hf[key])
            assert np.abs(after.array(key) - want).max() <= 1.5 / 127 * np.abs(want).max(), key


READ_BACK = {  # case -> (transformers architecture, tensors the GGUF has and transformers not, and vice versa)
    "llama": ("LlamaForCausalLM", set(), set()),
    "gemma2": ("Gemma2ForCausalLM", set(), {"lm_head.weight"}),  # llama.cpp's gemma2 uses the embedding
    "gemma3_text": ("Gemma3ForCausalLM", set(), set()),
    "phi3-longrope": ("Phi3ForCausalLM", {"rope_factors_long.weight", "rope_factors_short.weight"}, set()),
}


@pytest.mark.parametrize("case", list(READ_BACK))
def test_gguf_reader_gives_transformers_names_and_row_order(case, tmp_path):
    architecture, generated, dropped = READ_BACK[case]
    base, _ = make_base(tmp_path / "hf", case)
    checkpoint = GGUFCheckpoint(converted(base, tmp_path, "f32"))
    hf = {name: t for name, t in read_tensors(base).items() if name not in dropped}
    assert set(checkpoint.keys()) == set(hf) | generated
    for name, tensor in hf.items():
        if checkpoint.raw(name).shift:  # Gemma's norms: the file holds fl(1 + w) in float32, read back as it - 1
            stored = tensor.numpy() + np.float32(1)
            np.testing.assert_array_equal(checkpoint.array(name, stored=True), stored, err_msg=name)
            np.testing.assert_array_equal(checkpoint.array(name), stored - np.float32(1), err_msg=name)
            assert name.endswith("norm.weight")
            continue
        np.testing.assert_array_equal(checkpoint.array(name), tensor.numpy(), err_msg=name)
        rows = tensor.shape[0]
        np.testing.assert_array_equal(
            checkpoint.elements(name, tensor.numel() // rows, 3 * tensor.numel() // rows),
            tensor.numpy().reshape(-1)[tensor.numel() // rows : 3 * tensor.numel() // rows],
            err_msg=name,
        )
    assert checkpoint.config["architectures"] == [architecture]
    shifted = {name for name, raw in checkpoint.raws.items() if raw.shift}
    assert shifted == ({n for n in hf if n.endswith("norm.weight")} if case.startswith("gemma") else set())


def test_cli_merges_into_gguf(tmp_path):
    base = make_model(tmp_path / "hf", "qwen3", "spm", head_dim=16)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["o_proj"], dtype=torch.float32)
    out = tmp_path / "cli.gguf"
    assert main(["merge", str(converted(base, tmp_path, "q8_0")), str(adapter), "-o", str(out), "-q"]) == 0
    fields, _ = read_gguf(out)
    assert PROVENANCE_KEY in fields


def test_gguf_base_into_safetensors_is_refused(tmp_path):
    base = make_model(tmp_path / "hf", "llama", "spm")
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(LorafuseError, match="a GGUF base merges into a GGUF"):
        lorafuse.merge(converted(base, tmp_path, "f32"), [adapter], tmp_path / "out")


def test_gguf_of_an_unmapped_architecture_is_refused(tmp_path, llama_untied):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    adapter = make_peft_adapter(llama_untied, tmp_path / "adapter", target_modules=["q_proj"])
    with pytest.raises(LorafuseError, match="cannot map GGUF architecture gpt2"):
        lorafuse.merge(path, [adapter], tmp_path / "m.gguf")
