"""The shipped tiny example merges and matches PEFT."""

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lorafuse
from lorafuse.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny"


def test_example_merge_matches_peft_in_fp32(tmp_path):
    out = tmp_path / "merged"
    report = lorafuse.merge(EXAMPLE / "base", [EXAMPLE / "adapter"], out, dtype="fp32")
    assert report.tensors_touched == 14
    base = AutoModelForCausalLM.from_pretrained(EXAMPLE / "base", dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, EXAMPLE / "adapter").merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
    assert (out / "generation_config.json").is_file()
    assert (out / "lorafuse_merge.json").is_file()


def test_example_cli_merge_keeps_bf16(tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(EXAMPLE / "base"), str(EXAMPLE / "adapter"), "-o", str(out)]) == 0
    assert "14 of 24 tensors changed" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
