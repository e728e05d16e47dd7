"""LoRA on parameters (``target_parameters``): the fused 3-D experts of transformers 5 MoE models (Qwen3-MoE stores
them (experts, out, in), gpt-oss (experts, in, out)), merged as PEFT's ParamWrapper merges them, beside LoRA on
attention."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import input_ids, load_model, make_peft_adapter, peft_merged, read_tensors
from safetensors.torch import load_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import AdapterError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _save(model, folder):
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return _save(Qwen3MoeForCausalLM(config), tmp_path_factory.mktemp("moe") / "qwen3-moe")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """hidden == intermediate: down_proj's experts are square, so only the model type tells their orientation."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention", "sliding_attention"], sliding_window=8,
    )  # fmt: skip
    return _save(GptOssForCausalLM(config), tmp_path_factory.mktemp("moe") / "gpt-oss")


def peft_files(model, folder) -> dict[str, torch.Tensor]:
    """PEFT's merged model as transformers saves it (its checkpoint layout: per-expert weights where the Hub's
    files have them), to compare with lorafuse's output name by name."""
    model.save_pretrained(folder)
    return read_tensors(folder)


def experts_adapter(base, out, **kwargs):
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return make_peft_adapter(base, out, target_parameters=EXPERTS, **kwargs)


@pytest.mark.parametrize("fixture", ["qwen3_moe", "gpt_oss"])
def test_lora_on_experts_and_attention_merges_like_peft(fixture, request, tmp_path):
    base = request.getfixturevalue(fixture)
    adapter = experts_adapter(base, tmp_path / "adapter", r=2, lora_alpha=6)
    out = tmp_path / "merged"
    lorafuse.merge(base, [adapter], out, dtype="fp32")
    expected_model = peft_merged(base, [adapter])
    expected = peft_files(expected_model, tmp_path / "peft")
    merged, original = read_tensors(out), read_tensors(base)
    assert merged.keys() == expected.keys() == original.keys()
    changed = sorted(k for k in merged if not torch.equal(merged[k], original[k]))
    assert changed == sorted(k for k in expected if not torch.equal(expected[k], original[k]))
    per_expert = fixture == "qwen3_moe"  # Qwen3-MoE files hold one weight per expert, gpt-oss the fused ones
    assert len(changed) == 2 * 2 + 2 * (3 * 4 if per_expert else 2)
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, expected_model(ids).logits, rtol=1e-4, atol=1e-5)


def test_rank_and_alpha_patterns_key_on_the_parameter(qwen3_moe, tmp_path):
    adapter = experts_adapter(
        qwen3_moe,
        tmp_path / "adapter",
        target_modules=["q_proj"],
        rank_pattern={"down_proj": 3},
        alpha_pattern={"gate_up_proj": 5},
    )
    lorafuse.merge(qwen3_moe, [adapter], tmp_path / "merged", dtype="fp32")
    expected = peft_files(peft_merged(qwen3_moe, [adapter]), tmp_path / "peft")
    merged = read_tensors(tmp_path / "merged")
    for name in ("model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.experts.2.up_proj.weight"):
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_square_experts_without_a_config_are_refused_then_named(gpt_oss, tmp_path, capsys):
    adapter = experts_adapter(gpt_oss, tmp_path / "adapter", target_modules=[])
    single = tmp_path / "gpt-oss.safetensors"
    shutil.copy(gpt_oss / "model.safetensors", single)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(AdapterError, match=r"experts.*\(experts, out, in\) or \(experts, in, out\).*--conv1d-modules"):
        lorafuse.merge(single, [adapter], out, dtype="fp32")
    assert main(["merge", str(single), str(adapter), "-o", str(out), "--conv1d-modules", "experts"]) == 0
    expected = peft_merged(gpt_oss, [adapter]).state_dict()
    name = "model.layers.0.mlp.experts.down_proj"
    torch.testing.assert_close(load_file(out)[name], expected[name], rtol=1e-5, atol=1e-6)


def test_lora_on_a_2d_parameter_merges_like_peft(qwen3_moe, tmp_path):
    adapter = make_peft_adapter(
        qwen3_moe, tmp_path / "adapter", target_modules=[], target_parameters=["self_attn.o_proj.weight"]
    )
    lorafuse.merge(qwen3_moe, [adapter], tmp_path / "merged", dtype="fp32")
    expected = peft_files(peft_merged(qwen3_moe, [adapter]), tmp_path / "peft")
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(read_tensors(tmp_path / "merged")[name], expected[name], rtol=1e-5, atol=1e-6)


def test_saved_factors_that_fit_no_targeted_parameter_are_refused(qwen3_moe, tmp_path):
    adapter = experts_adapter(qwen3_moe, tmp_path / "adapter", target_modules=[])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_parameters"] = ["mlp.experts.down_proj"]  # the saved gate_up_proj factors fit no named one
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="none of .*down_proj fits"):
        lorafuse.merge(qwen3_moe, [adapter], tmp_path / "merged")


def test_verify_recomputes_expert_merges(qwen3_moe, tmp_path):
    from lorafuse.verify import verify

    adapter = experts_adapter(qwen3_moe, tmp_path / "adapter")
    lorafuse.merge(qwen3_moe, [adapter], tmp_path / "merged")
    assert verify(tmp_path / "merged", qwen3_moe, [adapter], outputs=False).passed


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_updates_on_numpy_and_torch_ops_match_the_per_expert_product(transposed, tmp_path):
    """Rows of a 3-D parameter are experts: blocks of 2 of 3 experts through numpy and TorchOps (the CUDA kernel's
    operations, on the CPU here) give scale * B[:, e::E] @ A[e*r:(e+1)*r] for each expert (transposed: its .T)."""
    import numpy as np
    from safetensors.torch import save_file

    from lorafuse.edits import BlockOps, TensorRef
    from lorafuse.engine.cuda import TorchOps
    from lorafuse.io.checkpoint import Checkpoint
    from lorafuse.tuners.lora_parameters import ParamLoraDelta

    experts, rank, out, inp = 3, 2, 5, 4
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rank * experts, inp, generator=gen), torch.randn(out, rank * experts, generator=gen)
    save_file({"a": a, "b": b}, tmp_path / "f.safetensors")
    ckpt = Checkpoint([tmp_path / "f.safetensors"])
    edit = ParamLoraDelta(TensorRef(ckpt, "a"), TensorRef(ckpt, "b"), 0.5, experts=experts, transposed=transposed)
    deltas = [0.5 * b[:, e::experts] @ a[e * rank : (e + 1) * rank] for e in range(experts)]
    expected = torch.stack([d.T if transposed else d for d in deltas]).reshape(experts, -1)
    for ops, block in ((BlockOps(), np.zeros((experts, out * inp), np.float32)), (TorchOps("cpu"), None)):
        block = torch.zeros(experts, out * inp) if block is None else block
        for start in range(0, experts, 2):
            stop = min(start + 2, experts)
            edit.apply(block[start:stop], slice(start, stop), ops)
        torch.testing.assert_close(torch.as_tensor(block), expected, rtol=1e-6, atol=1e-6)
    ckpt.close()
