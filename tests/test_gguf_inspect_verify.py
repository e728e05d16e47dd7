"""``lorafuse inspect`` and ``lorafuse verify`` on GGUF files: the report says what the file holds, and verify
passes a correct GGUF merge (from a model folder or a GGUF base) and fails a wrong one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf_oracle import read_gguf
from helpers import make_peft_adapter
from test_gguf_base import converted
from test_gguf_merge import make_model

import lorafuse
from lorafuse.cli import main
from lorafuse.inspect import inspect_path, render
from lorafuse.verify import verify


@pytest.fixture
def merged_llama(tmp_path):
    base = make_model(tmp_path / "hf", "llama", "spm")
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "up_proj"])
    return base, adapter


def test_inspect_reports_architecture_types_and_provenance(merged_llama, tmp_path, capsys):
    base, adapter = merged_llama
    out = tmp_path / "m.gguf"
    lorafuse.merge(base, [adapter], out, outtype="q8_0")
    report = inspect_path(out)
    assert report["kind"] == "gguf" and report["architecture"] == "llama"
    _, tensors = read_gguf(out)
    assert report["tensors"] == len(tensors)
    assert report["types"]["F32"]["tensors"] == 5  # four layer norms and the final norm
    assert report["types"]["Q8_0"]["tensors"] == len(tensors) - 5
    assert report["metadata"]["general.file_type"] == "MOSTLY_Q8_0"
    assert report["provenance"]["adapters"][0]["format"] == "peft"
    assert set(report["provenance"]["base"]["files"]) >= {"config.json", "tokenizer.model", "tokenizer_config.json"}
    assert "Q8_0" in render(report)
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "llama"


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_verify_passes_a_merge_from_a_model_folder(merged_llama, tmp_path, outtype):
    base, adapter = merged_llama
    out = tmp_path / "m.gguf"
    lorafuse.merge(base, [adapter], out, outtype=outtype)
    report = verify(out, base, [adapter])
    assert report.passed and report.tensors_touched == 6, report.failures
    wrong = verify(out, base, [adapter], weights=[0.5])
    assert not wrong.passed and {f.name for f in wrong.failures} == {
        f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")
    }


def test_verify_of_a_gguf_base_merge_checks_copies_byte_for_byte(merged_llama, tmp_path):
    base, adapter = merged_llama
    source = converted(base, tmp_path, "q8_0")
    out = tmp_path / "m.gguf"
    lorafuse.merge(source, [adapter], out)
    assert verify(out, source, [adapter]).passed
    assert len(inspect_path(out)["provenance"]["base"]["gguf_header_sha256"]) == 64
    # One changed byte in an untouched tensor: a copy that is not the base's.
    _, tensors = read_gguf(out)
    t = tensors["blk.0.ffn_down.weight"]
    with open(out, "r+b") as handle:
        handle.seek(int(t.data_offset) + 5)
        byte = handle.read(1)
        handle.seek(int(t.data_offset) + 5)
        handle.write(bytes([byte[0] ^ 0x40]))
    report = verify(out, source, [adapter])
    assert [f.name for f in report.failures] == ["model.layers.0.mlp.down_proj.weight"]
    assert "base's bytes" in report.failures[0].problem


def test_verify_fails_a_quantized_tensor_off_by_more_than_its_rounding(merged_llama, tmp_path):
    base, adapter = merged_llama
    out = tmp_path / "m.gguf"
    lorafuse.merge(base, [adapter], out, outtype="q8_0")
    _, tensors = read_gguf(out)
    t = tensors["blk.1.attn_q.weight"]
    blocks = np.asarray(t.data).reshape(-1, 34)
    with open(out, "r+b") as handle:  # the first block's quant values shifted by 3 steps
        handle.seek(int(t.data_offset) + 2)
        handle.write(((blocks[0, 2:].view(np.int8).astype(np.int16) + 3).clip(-127, 127)).astype(np.int8).tobytes())
    report = verify(out, base, [adapter])
    assert [f.name for f in report.failures] == ["model.layers.1.self_attn.q_proj.weight"]
    assert "Q8_0 rounding" in report.failures[0].problem


def test_verify_without_adapters_is_one_line(merged_llama, tmp_path):
    base, adapter = merged_llama
    out = tmp_path / "m.gguf"
    lorafuse.merge(base, [adapter], out, outtype="f16")
    with pytest.raises(lorafuse.LorafuseError, match="pass --base and --adapter"):
        verify(out)


def test_verify_checks_the_generated_rope_freqs_of_llama3_rope(tmp_path):
    from test_gguf_merge import LLAMA3_ROPE

    base = make_model(tmp_path / "hf", "llama", "spm", rope_parameters=LLAMA3_ROPE)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "m.gguf"
    lorafuse.merge(base, [adapter], out, outtype="f16")
    report = verify(out, base, [adapter])
    assert report.passed, report.failures
    t = read_gguf(out)[1]["rope_freqs.weight"]
    with open(out, "r+b") as handle:  # one factor changed
        handle.seek(int(t.data_offset))
        handle.write(np.float32(3.0).tobytes())
    assert [f.name for f in verify(out, base, [adapter]).failures] == ["rope_freqs.weight"]
