"""The shipped tiny example merges and matches PEFT."""

import subprocess
import sys
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


def test_merge_extract_verify_and_inspect_need_no_torch(tmp_path):
    """torch is an extra (pip install lorafuse brings none): the everyday commands must run where it is missing."""
    script = (
        "import sys; sys.modules['torch'] = None\n"  # import torch now fails
        "from lorafuse.cli import main\n"
        f"base, adapter, out = {str(EXAMPLE / 'base')!r}, {str(EXAMPLE / 'adapter')!r}, {str(tmp_path)!r}\n"
        "assert main(['merge', base, adapter, '-o', out + '/m']) == 0\n"
        "assert main(['verify', out + '/m', '--base', base, '--adapter', adapter, '--no-output-check']) == 0\n"
        "assert main(['extract', base, out + '/m', '-o', out + '/x', '--rank', '4', '--min-params', '0']) == 0\n"
        "assert main(['inspect', adapter]) == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" not in proc.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "x" / "adapter_config.json").is_file()
