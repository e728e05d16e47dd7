"""lorafuse.runtime: on-the-fly LoRA matches PEFT's forward; remove restores; merge_into matches merging; inject/save
round trips through PEFT and ``lorafuse merge``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import (
    input_ids,
    load_conv_net,
    load_model,
    make_peft_adapter,
    peft_merged,
    peft_model,
    read_tensors,
)
from peft import PeftModel
from safetensors.torch import save_file

import lorafuse
from lorafuse.errors import AdapterError, ShapeMismatchError
from lorafuse.formats import read_adapter
from lorafuse.runtime import (
    LoraModule,
    adapter_names,
    apply_adapter,
    inject_lora,
    merge_into,
    remove_adapter,
    save_adapter,
)

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids() if ids is None else ids).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def llama_adapters(llama_untied, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-adapters")
    return {
        "lora": make_peft_adapter(llama_untied, root / "lora", target_modules=LLAMA_TARGETS),
        "dora": make_peft_adapter(
            llama_untied, root / "dora", seed=2, r=3, lora_alpha=5, use_dora=True, target_modules=LLAMA_TARGETS
        ),
        "rslora": make_peft_adapter(
            llama_untied, root / "rslora", seed=3, r=6, use_rslora=True, target_modules=["k_proj", "gate_proj"]
        ),
    }


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_llama_forward_matches_peft(llama_untied, llama_adapters, kind):
    model = load_model(llama_untied)
    base = logits(model)
    apply_adapter(model, llama_adapters[kind])
    assert isinstance(model.model.embed_tokens, LoraModule)
    out = logits(model)
    assert (out - base).abs().max() > 1e-2  # the adapter does something
    assert_close(out, logits(peft_model(llama_untied, [llama_adapters[kind]])))


def test_multiple_weighted_adapters_match_peft(llama_untied, llama_adapters):
    order = [llama_adapters["lora"], llama_adapters["dora"], llama_adapters["rslora"]]
    weights = [0.6, 1.4, -0.8]
    model = load_model(llama_untied)
    names = [apply_adapter(model, path, weight=w) for path, w in zip(order, weights)]
    assert adapter_names(model) == names
    assert_close(logits(model), logits(peft_model(llama_untied, order, weights)))


def test_apply_accepts_adapter_input_and_its_weight(llama_untied, llama_adapters):
    model = load_model(llama_untied)
    apply_adapter(model, read_adapter(llama_adapters["lora"], weight=0.5), weight=2.0, name="mine")
    assert adapter_names(model) == ["mine"]
    assert_close(logits(model), logits(peft_model(llama_untied, [llama_adapters["lora"]])))


def test_half_precision_base_matches_peft(llama_bf16, tmp_path):
    adapter = make_peft_adapter(llama_bf16, tmp_path / "a", target_modules=["q_proj", "up_proj"], use_dora=True)
    model = load_model(llama_bf16, dtype=torch.bfloat16)
    apply_adapter(model, adapter)
    assert model.model.layers[0].self_attn.q_proj.lora["adapter0"].lora_A.dtype == torch.float32
    out = logits(model)
    assert out.dtype == torch.bfloat16
    expected = logits(peft_model(llama_bf16, [adapter], dtype=torch.bfloat16))
    assert_close(out.float(), expected.float(), tol=2e-2)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_fan_in_fan_out_matches_peft(gpt2, tmp_path, use_dora):
    adapter = make_peft_adapter(
        gpt2, tmp_path / "a", target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True, use_dora=use_dora
    )
    model = load_model(gpt2)
    base = logits(model)
    apply_adapter(model, adapter)
    assert isinstance(model.transformer.h[0].attn.c_attn, LoraModule)
    out = logits(model)
    assert (out - base).abs().max() > 1e-2
    assert_close(out, logits(peft_model(gpt2, [adapter])))


def test_lora_bias_and_modules_to_save_match_peft(qwen2, tmp_path):
    adapter = make_peft_adapter(
        qwen2, tmp_path / "a", target_modules=["q_proj", "k_proj"], lora_bias=True, modules_to_save=["lm_head"]
    )
    model = load_model(qwen2)
    base = logits(model)
    original_head = model.lm_head.weight
    apply_adapter(model, adapter)
    assert model.model.layers[0].self_attn.q_proj.lora["adapter0"].lora_bias is not None
    assert model.lm_head.weight is not original_head  # swapped for the adapter's copy
    expected = logits(peft_model(qwen2, [adapter]))
    assert_close(logits(model), expected)
    merged = load_model(qwen2)
    apply_adapter(merged, adapter)
    assert_close(logits(merge_into(merged)), expected)
    remove_adapter(model)
    assert model.lm_head.weight is original_head
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_layers_match_peft(conv_net, tmp_path, use_dora):
    adapter = make_peft_adapter(
        conv_net,
        tmp_path / "a",
        module=load_conv_net(conv_net),
        target_modules=["conv1", "conv2", "head"],
        use_dora=use_dora,
    )
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    net = load_conv_net(conv_net)
    apply_adapter(net, adapter)
    expected = peft_model(conv_net, [adapter], module=load_conv_net(conv_net))
    with torch.no_grad():
        assert_close(net(x), expected(x))


def test_remove_restores_model_exactly(llama_untied, llama_adapters):
    model = load_model(llama_untied)
    keys = list(model.state_dict())
    base = logits(model)
    first = apply_adapter(model, llama_adapters["lora"])
    apply_adapter(model, llama_adapters["dora"], name="second")
    remove_adapter(model, first)
    assert adapter_names(model) == ["second"]
    assert_close(logits(model), logits(peft_model(llama_untied, [llama_adapters["dora"]])))
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        remove_adapter(model, "nope")
    remove_adapter(model)
    assert adapter_names(model) == []
    assert not any(isinstance(m, LoraModule) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert torch.equal(logits(model), base)


def test_wrong_model_is_refused_and_left_untouched(gpt2, llama_adapters):
    model = load_model(gpt2)
    base = logits(model)
    with pytest.raises(ShapeMismatchError, match="is this the model the adapter was trained on"):
        apply_adapter(model, llama_adapters["lora"])
    assert adapter_names(model) == []
    assert torch.equal(logits(model), base)


def test_duplicate_name_is_refused(llama_untied, llama_adapters):
    model = load_model(llama_untied)
    apply_adapter(model, llama_adapters["lora"], name="x")
    with pytest.raises(AdapterError, match="already has an adapter named 'x'"):
        apply_adapter(model, llama_adapters["dora"], name="x")


def test_merge_into_matches_lorafuse_merge(llama_untied, llama_adapters, tmp_path):
    order = [llama_adapters["dora"], llama_adapters["rslora"]]
    weights = [0.7, 1.2]
    model = load_model(llama_untied)
    for path, w in zip(order, weights):
        apply_adapter(model, path, weight=w)
    merge_into(model)
    assert not any(isinstance(m, LoraModule) for m in model.modules())
    assert adapter_names(model) == []
    lorafuse.merge(llama_untied, order, tmp_path / "merged", weights=weights, dtype="fp32")
    expected = read_tensors(tmp_path / "merged")
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert_close(state[key], value)


def test_merge_into_matches_peft_merge(llama_untied, llama_adapters):
    # Both adapters carry a saved copy of the embedding (PEFT's save_embedding_layers) besides its LoRA.
    order = [llama_adapters["lora"], llama_adapters["dora"]]
    weights = [0.7, 1.2]
    model = load_model(llama_untied)
    for path, w in zip(order, weights):
        apply_adapter(model, path, weight=w)
    live = logits(model)
    merge_into(model)
    assert_close(logits(model), live)
    assert_close(logits(model), logits(peft_merged(llama_untied, order, weights)))


def test_merge_into_unties_a_tied_head(llama_tied):
    model = load_model(llama_tied)
    embedding = model.model.embed_tokens.weight.detach().clone()
    inject_lora(model, target_modules=["lm_head"], rank=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _train_a_little(model)
    live = logits(model)
    merge_into(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.config.tie_word_embeddings is False
    assert_close(logits(model), live)


def _train_a_little(model) -> None:
    """Stand-in for training: move every LoRA tensor off its initial value."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def test_inject_lora_starts_as_identity_and_trains_only_lora(llama_untied):
    model = load_model(llama_untied)
    base = logits(model)
    wrapped = inject_lora(model, target_modules=["q_proj", "v_proj", "embed_tokens"], rank=4, alpha=8)
    assert len(wrapped) == 5 and "model.embed_tokens" in wrapped
    assert torch.equal(logits(model), base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 10 and all(".lora." in n for n in trainable)
    patch = model.model.layers[0].self_attn.q_proj.lora["default"]
    assert patch.lora_A.abs().sum() > 0 and patch.lora_B.abs().sum() == 0
    emb = model.model.embed_tokens.lora["default"]
    assert emb.lora_A.abs().sum() == 0 and emb.lora_B.abs().sum() > 0
    with pytest.raises(AdapterError, match="matched no nn.Linear"):
        inject_lora(model, target_modules=["nothing_here"], name="other")


def test_inject_all_linear_skips_the_head(llama_untied):
    model = load_model(llama_untied)
    wrapped = inject_lora(model, rank=2)
    assert len(wrapped) == 14 and "lm_head" not in wrapped
    regex = inject_lora(load_model(llama_untied), target_modules=r"model\.layers\.1\..*_proj", rank=2)
    assert len(regex) == 7 and all(n.startswith("model.layers.1.") for n in regex)


def test_adapter_names_match_across_head_prefixes(bert, tmp_path):
    from transformers import AutoModel, BertForMaskedLM

    adapter = make_peft_adapter(bert, tmp_path / "a", model_cls=AutoModel, target_modules=["query", "value"])
    masked_lm = BertForMaskedLM.from_pretrained(bert).eval()  # names start with "bert.", the adapter's do not
    apply_adapter(masked_lm, adapter)
    ids = input_ids()
    with torch.no_grad():
        ours = masked_lm.bert(ids).last_hidden_state
        expected = peft_model(bert, [adapter], model_cls=AutoModel)(ids).last_hidden_state
    assert_close(ours, expected)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_adapter_loads_in_peft_and_merges(llama_untied, tmp_path, use_rslora):
    model = load_model(llama_untied)
    inject_lora(model, ["q_proj", "down_proj", "embed_tokens", "lm_head"], rank=4, alpha=12, use_rslora=use_rslora)
    _train_a_little(model)
    model.eval()
    trained = logits(model)
    folder = save_adapter(model, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(load_model(llama_untied), folder).eval()
    assert_close(logits(peft), trained)
    peft.save_pretrained(tmp_path / "resaved", save_embedding_layers=False)  # PEFT writes the very same file
    weights = "adapter_model.safetensors"
    assert (tmp_path / "resaved" / weights).read_bytes() == (folder / weights).read_bytes()
    lorafuse.merge(llama_untied, [folder], tmp_path / "merged", dtype="fp32")
    assert_close(logits(load_model(tmp_path / "merged")), trained)
    with pytest.raises(lorafuse.errors.OutputError, match="--overwrite"):
        save_adapter(model, tmp_path / "adapter")
    save_adapter(model, tmp_path / "adapter", overwrite=True)


def test_save_refuses_an_applied_adapter(llama_untied, llama_adapters, tmp_path):
    model = load_model(llama_untied)
    apply_adapter(model, llama_adapters["lora"], name="loaded")
    with pytest.raises(AdapterError, match="created by inject_lora"):
        save_adapter(model, tmp_path / "out", name="loaded")


def test_training_example_runs(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "train_toy_lora.py"
    spec = importlib.util.spec_from_file_location("train_toy_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(tmp_path, steps=25)
    assert result["end_loss"] < result["start_loss"] / 2
    assert result["difference"] < 1e-4


class _AttentionNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


def test_layers_called_by_weight_get_an_edited_copy(tmp_path):
    # nn.MultiheadAttention never calls out_proj's forward, so a wrapper there would do nothing.
    torch.manual_seed(0)
    net = _AttentionNet().eval()
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    save_file(
        {"base_model.model.attn.out_proj.lora_A.weight": A, "base_model.model.attn.out_proj.lora_B.weight": B},
        folder / "adapter_model.safetensors",
    )
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    expected = _AttentionNet().eval()
    expected.load_state_dict(net.state_dict())
    with torch.no_grad():
        expected.attn.out_proj.weight.add_(2.0 * B @ A)
        base = net(x)
        apply_adapter(net, folder)
        assert not isinstance(net.attn.out_proj, LoraModule)
        assert_close(net(x), expected(x))
        remove_adapter(net)
        assert torch.equal(net(x), base)
