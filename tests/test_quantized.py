"""Quantized bases: fp8 block-scaled weights are dequantized on the fly; packed integer formats are refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import make_llama, make_peft_adapter, read_tensors
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.quantized import QuantizedBaseError, detect_quantization
from lorafuse.verify import verify

BLOCK = (16, 24)  # 32 and 64 are not multiples of 24: partial blocks at the edges are exercised
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX = 448.0


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise fp8 e4m3 quantization as DeepSeek/Qwen FP8 checkpoints store it: W ~ W8 * scale_inv per block."""
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            scale = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scales[i, j] = scale
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / scale).to(q.dtype)
    return q, scales


def dequantize_reference(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The textbook dequantization (every element times its block's scale), independent of lorafuse's code."""
    rows, cols = q.shape
    expanded = scales.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * expanded


@pytest.fixture(scope="module")
def fp8_setup(tmp_path_factory):
    """A tiny Llama saved in bf16, its fp8 block-quantized copy, and a LoRA adapter trained on the bf16 model."""
    root = tmp_path_factory.mktemp("fp8")
    bf16 = make_llama(root, dtype=torch.bfloat16, name="llama-bf16", seed=3)
    fp8 = root / "llama-fp8"
    fp8.mkdir()
    tensors = {}
    for name, tensor in load_file(bf16 / "model.safetensors").items():
        if name.endswith(".weight") and name.split(".")[-2] in QUANTIZED:
            q, scales = quantize_fp8(tensor, BLOCK)
            tensors[name] = q
            tensors[name + "_scale_inv"] = scales
        else:
            tensors[name] = tensor
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    adapter = make_peft_adapter(bf16, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"], seed=4)
    return fp8, adapter, tensors


def test_fp8_base_is_dequantized_and_merged(fp8_setup, tmp_path):
    fp8, adapter, stored = fp8_setup
    out = tmp_path / "merged"
    report = lorafuse.merge(fp8, [adapter], out)
    merged = read_tensors(out)
    assert not any(k.endswith("_scale_inv") for k in merged)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert report.tensors_touched == 6

    lora = load_file(adapter / "adapter_model.safetensors")
    for name, q in stored.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        assert merged[name].dtype == torch.bfloat16
        expected = dequantize_reference(q, stored[name + "_scale_inv"], BLOCK)
        module = name[: -len(".weight")]
        key_a = f"base_model.model.{module}.lora_A.weight"
        if key_a in lora:
            delta = lora[key_a.replace("lora_A", "lora_B")].float() @ lora[key_a].float()
            expected = expected + (8 / 4) * delta  # lora_alpha 8 / r 4
            torch.testing.assert_close(merged[name].float(), expected, rtol=2**-8, atol=1e-6)
        else:  # untouched: dequantized and rounded once
            assert torch.equal(merged[name], expected.to(torch.bfloat16)), name


def test_fp8_merge_loads_in_transformers_and_verifies(fp8_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    fp8, adapter, _stored = fp8_setup
    out = tmp_path / "merged"
    lorafuse.merge(fp8, [adapter], out, dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(out)
    merged = read_tensors(out)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, merged["model.layers.1.mlp.down_proj.weight"])
    with torch.no_grad():
        logits = model(torch.arange(10)[None]).logits
    assert torch.isfinite(logits).all()
    report = verify(out, fp8, [adapter])
    assert report.passed and report.max_ulp <= 0.5, report.failures
    # The output-level reference is the base dequantized by lorafuse (transformers cannot run fp8 on CPU).
    assert report.output.ran and report.output.max_logit_diff < 1e-4 * report.output.max_logit


BNB4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
BNB8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}
AWQ = {"quant_method": "awq", "bits": 4, "version": "gemm"}


@pytest.mark.parametrize(("quant", "words"), [(BNB4, "4-bit"), (BNB8, "8-bit"), (GPTQ, "gptq"), (AWQ, "awq")])
def test_quantized_base_is_refused_before_writing(fp8_setup, tmp_path, capsys, quant, words):
    fp8, adapter, _ = fp8_setup
    base = tmp_path / "quantized"
    base.mkdir()
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = quant
    config["_name_or_path"] = "org/original-model"
    (base / "config.json").write_text(json.dumps(config))
    shutil.copy(fp8 / "model.safetensors", base / "model.safetensors")  # a link out of the folder is refused
    out = tmp_path / "merged"
    with pytest.raises(QuantizedBaseError, match="org/original-model"):
        lorafuse.merge(base, [adapter], out)
    assert not out.exists()
    assert main(["merge", str(base), str(adapter), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "unquantized" in err and "then quantize" in err
    assert not out.exists()


def test_quantization_detected_from_tensor_names():
    assert detect_quantization(None, ["a.weight"]) is None
    gptq = detect_quantization(None, ["layer.qweight", "layer.qzeros", "layer.scales"])
    assert gptq is not None and not gptq.dequantizable
    bnb = detect_quantization({}, ["l.weight", "l.weight.absmax", "l.weight.quant_map"])
    assert bnb is not None and bnb.method.startswith("bitsandbytes") and not bnb.dequantizable
    fp8 = detect_quantization(None, ["l.weight", "l.weight_scale_inv"])
    assert fp8 is not None and fp8.dequantizable


def test_fp8_scales_that_do_not_fit_are_an_error(fp8_setup, tmp_path):
    fp8, adapter, _ = fp8_setup
    base = tmp_path / "wrong-block"
    base.mkdir()
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128, 128]
    (base / "config.json").write_text(json.dumps(config))
    shutil.copy(fp8 / "model.safetensors", base / "model.safetensors")  # a link out of the folder is refused
    with pytest.raises(QuantizedBaseError, match="scales"):
        lorafuse.merge(base, [adapter], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_inspect_reports_fp8_quantization(fp8_setup):
    from lorafuse.inspect import inspect_path

    report = inspect_path(fp8_setup[0])
    assert report["kind"] == "model"
    assert report["quantization"]["method"] == "fp8" and report["quantization"]["dequantizable"]
    assert "float8_e4m3fn" in report["dtypes"]
