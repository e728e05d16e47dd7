"""``lorafuse merge`` computes what PEFT's ``merge_and_unload()`` computes, feature by feature and architecture by
architecture, and, where PEFT's merge and the trained model disagree (tied embeddings), what the trained model does.
"""

from __future__ import annotations

import json

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
from transformers import AutoModel, AutoModelForCausalLM

import lorafuse

# PEFT's own advice about tied layers and embedding saving, and its ZeRO-3 check misreading lora_B.bias.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(tie_word_embeddings|save_embedding_layers|invalid shape):UserWarning"
)

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (base model fixture, LoraConfig kwargs, model class the adapter is trained on)
CASES = {
    "llama-plain": ("llama_untied", dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8), None),
    "llama-all-linear": ("llama_untied", dict(target_modules="all-linear", r=2, lora_alpha=4), None),
    "llama-regex-targets": ("llama_untied", dict(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"), None),
    "llama-rslora": (
        "llama_untied",
        dict(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=3, use_rslora=True),
        None,
    ),
    "llama-patterns": (
        "llama_untied",
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            r=4,
            lora_alpha=8,
            rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.down_proj": 20},
        ),
        None,
    ),
    "llama-layers-to-transform": (
        "llama_untied",
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
        None,
    ),
    "llama-embedding": ("llama_untied", dict(target_modules=["embed_tokens", "o_proj"], r=4, lora_alpha=6), None),
    "llama-dora": ("llama_untied", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), None),
    "llama-dora-embedding": ("llama_untied", dict(target_modules=["embed_tokens", "k_proj"], use_dora=True), None),
    "llama-modules-to-save": ("llama_untied", dict(target_modules=["v_proj"], modules_to_save=["lm_head"]), None),
    "qwen2-bias-all": ("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="all"), None),
    "qwen2-bias-lora-only": ("qwen2", dict(target_modules=["k_proj", "v_proj", "o_proj"], bias="lora_only"), None),
    "qwen2-lora-bias": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True), None),
    "qwen2-dora-biased-layers": (
        "qwen2",
        dict(target_modules=["q_proj", "v_proj"], use_dora=True, bias="lora_only"),
        None,
    ),
    "gpt2-fan-in-fan-out": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), None),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True), None),
    "gpt2-bias-all-modules-to-save": (
        "gpt2",
        dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all", modules_to_save=["ln_f"]),
        None,
    ),
    # Trained on the bare BertModel ("encoder.layer..."), merged into a BertForMaskedLM checkpoint ("bert.encoder...").
    "bert-bare-model-into-mlm-head": (
        "bert",
        dict(
            target_modules=["query", "value", "intermediate.dense", "output.dense"],
            modules_to_save=["LayerNorm"],
            bias="lora_only",
        ),
        AutoModel,
    ),
    "bert-dora": ("bert", dict(target_modules=["key", "output.dense"], use_dora=True), AutoModel),
}


def _file_to_model_keys(file_keys, model_keys) -> dict[str, str]:
    """Map checkpoint tensor names onto a model's state-dict names (a head class may add a prefix like ``bert.``)."""
    model_keys = set(model_keys)
    mapping = {}
    for key in file_keys:
        parts = key.split(".")
        found = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in model_keys), None)
        if found is not None:
            mapping[key] = found
    return mapping


def _outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_fp32(case, request, tmp_path):
    fixture, lora_kwargs, model_cls = CASES[case]
    base_dir = request.getfixturevalue(fixture)
    adapter = make_peft_adapter(base_dir, tmp_path / "adapter", model_cls=model_cls, **lora_kwargs)
    out = tmp_path / "merged"
    report = lorafuse.merge(base_dir, [adapter], out, dtype="fp32")
    assert report.warnings == []

    expected = peft_merged(base_dir, [adapter], model_cls=model_cls)
    merged = load_model(out, model_cls)
    ids = input_ids()
    torch.testing.assert_close(_outputs(merged, ids), _outputs(expected, ids), rtol=1e-5, atol=1e-5)

    # Tensor by tensor: what PEFT changed we change the same way; everything else is bit-identical to the base.
    base_tensors, out_tensors = read_tensors(base_dir), read_tensors(out)
    assert set(out_tensors) == set(base_tensors)
    expected_sd = expected.state_dict()
    names = _file_to_model_keys(base_tensors, expected_sd)
    for key in set(base_tensors) - set(names):  # a head the adapter's model class does not have: untouched
        assert torch.equal(out_tensors[key], base_tensors[key]), key
    changed = 0
    for key, model_key in names.items():
        want = expected_sd[model_key]
        if torch.equal(want, base_tensors[key]):
            assert torch.equal(out_tensors[key], base_tensors[key]), key
        else:
            changed += 1
            torch.testing.assert_close(out_tensors[key], want, rtol=1e-5, atol=1e-6, msg=key)
    assert changed > 0 and report.tensors_touched == changed


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_rounds_once(use_dora, llama_bf16, tmp_path):
    """A bf16 base merged in fp32 and rounded once; PEFT (adding in bf16) lands within bf16 rounding of it."""
    targets = ["q_proj", "v_proj", "embed_tokens"] if use_dora else ["q_proj", "v_proj", "up_proj", "embed_tokens"]
    adapter = make_peft_adapter(llama_bf16, tmp_path / "adapter", target_modules=targets, use_dora=use_dora)
    out = tmp_path / "merged"
    lorafuse.merge(llama_bf16, [adapter], out)  # dtype auto keeps bf16
    ours = read_tensors(out)
    exact = peft_merged(llama_bf16, [adapter], dtype=torch.float32).state_dict()
    peft_bf16 = peft_merged(llama_bf16, [adapter], dtype=torch.bfloat16).state_dict()
    base = read_tensors(llama_bf16)
    changed = 0
    for key, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, key
        if torch.equal(exact[key].to(torch.bfloat16), base[key]):
            assert torch.equal(tensor, base[key]), key
            continue
        changed += 1
        rounded = exact[key].to(torch.bfloat16)
        # One rounding of the fp32 result: equal except for rare ties decided by fp32 summation order.
        assert (tensor != rounded).float().mean() < 0.01, key
        torch.testing.assert_close(tensor.float(), rounded.float(), rtol=2**-7, atol=1e-6, msg=key)
        torch.testing.assert_close(tensor.float(), peft_bf16[key].float(), rtol=2**-6, atol=1e-3, msg=key)
    assert changed == 2 * (len(targets) - 1) + 1  # two layers per projection, plus the embedding


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_layers_match_peft(use_dora, conv_net, tmp_path):
    """Conv2d 3x3 and 1x1 (and a Linear) in a custom module that transformers cannot load: compare tensors."""
    from helpers import TinyConvNet

    adapter = make_peft_adapter(
        conv_net,
        tmp_path / "adapter",
        module=load_conv_net(conv_net),
        target_modules=["conv1", "conv2", "head"],
        use_dora=use_dora,
        r=3,
        lora_alpha=5,
    )
    out = tmp_path / "merged"
    report = lorafuse.merge(conv_net, [adapter], out, dtype="fp32")
    assert report.tensors_touched == 3
    expected = peft_merged(conv_net, [adapter], module=load_conv_net(conv_net)).state_dict()
    ours = read_tensors(out)
    base = read_tensors(conv_net)
    assert set(ours) == set(expected)
    for key in ours:
        if key.endswith("weight"):
            torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
            assert not torch.equal(ours[key], base[key]), key
        else:
            assert torch.equal(ours[key], base[key]), key
    merged = TinyConvNet().eval()
    merged.load_state_dict(ours)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    unmerged = peft_model(conv_net, [adapter], module=load_conv_net(conv_net))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("second_dora", [False, True], ids=["lora+lora", "lora+dora"])
def test_two_adapters_with_weights_match_peft(second_dora, llama_untied, tmp_path):
    """Adapters are merged in order, each adapter's update scaled by its --weight (PEFT's scale_layer)."""
    first = make_peft_adapter(llama_untied, tmp_path / "a1", target_modules=["q_proj", "v_proj", "down_proj"], seed=3)
    second = make_peft_adapter(
        llama_untied,
        tmp_path / "a2",
        target_modules=["v_proj", "o_proj", "down_proj"],
        use_rslora=True,
        use_dora=second_dora,
        seed=4,
    )
    weights = [0.7, -0.4]
    out = tmp_path / "merged"
    lorafuse.merge(llama_untied, [first, second], out, weights=weights, dtype="fp32")
    expected = peft_merged(llama_untied, [first, second], weights)
    merged = load_model(out)
    ids = input_ids()
    torch.testing.assert_close(_outputs(merged, ids), _outputs(expected, ids), rtol=1e-5, atol=1e-5)
    expected_sd = expected.state_dict()
    for key, tensor in read_tensors(out).items():
        torch.testing.assert_close(tensor, expected_sd[key], rtol=1e-5, atol=1e-6, msg=key)
    # The weights matter: unweighted would be a different model.
    unweighted = peft_merged(llama_untied, [first, second]).state_dict()
    key = "model.layers.0.self_attn.v_proj.weight"
    assert not torch.allclose(read_tensors(out)[key], unweighted[key], atol=1e-4)


TIE_CASES = {
    # model fixture, LoraConfig kwargs, the side of the tied pair the adapter changes
    "llama-embedding-lora": ("llama_tied", dict(target_modules=["embed_tokens", "q_proj"]), "embedding"),
    "llama-head-lora": ("llama_tied", dict(target_modules=["lm_head", "v_proj"]), "head"),
    "llama-head-modules-to-save": ("llama_tied", dict(target_modules=["v_proj"], modules_to_save=["lm_head"]), "head"),
    "llama-embedding-modules-to-save": (
        "llama_tied",
        dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"]),
        "embedding",
    ),
    "llama-both-sides-lora": ("llama_tied", dict(target_modules=["embed_tokens", "lm_head"]), "both"),
    "gpt2-embedding-lora": ("gpt2", dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True), "embedding"),
}


@pytest.mark.parametrize("case", list(TIE_CASES))
def test_tied_pair_changed_on_one_side_is_untied(case, request, tmp_path):
    """PEFT's merge would move both tied tensors; we write both and untie, matching the trained (unmerged) model."""
    fixture, lora_kwargs, side = TIE_CASES[case]
    base_dir = request.getfixturevalue(fixture)
    adapter = make_peft_adapter(base_dir, tmp_path / "adapter", **lora_kwargs)
    out = tmp_path / "merged"
    report = lorafuse.merge(base_dir, [adapter], out, dtype="fp32")
    assert report.config_updates.get("tie_word_embeddings") is False
    assert any("tie_word_embeddings=false" in w for w in report.warnings)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tensors = read_tensors(out)
    assert "lm_head.weight" in tensors

    trained = peft_model(base_dir, [adapter])  # unmerged: the function the adapter was trained as
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)
    emb_key = next(k for k in tensors if k.endswith(("embed_tokens.weight", "wte.weight")))
    assert not torch.equal(tensors[emb_key], tensors["lm_head.weight"])
    if side != "both":
        untouched = emb_key if side == "head" else "lm_head.weight"
        assert torch.equal(tensors[untouched], read_tensors(base_dir)[emb_key])  # it keeps the base bits


def test_adapter_not_touching_embeddings_keeps_them_tied(llama_tied, tmp_path):
    adapter = make_peft_adapter(llama_tied, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    out = tmp_path / "merged"
    report = lorafuse.merge(llama_tied, [adapter], out, dtype="fp32")
    assert "tie_word_embeddings" not in report.config_updates
    assert "lm_head.weight" not in read_tensors(out)
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = peft_merged(llama_tied, [adapter])
    ids = input_ids()
    torch.testing.assert_close(_outputs(merged, ids), _outputs(expected, ids), rtol=1e-5, atol=1e-5)


def test_ensure_weight_tying_adapter_stays_tied(llama_tied, tmp_path):
    """With ensure_weight_tying PEFT trains one update for the tied pair: the merge keeps them tied and equal.

    PEFT's own merge_and_unload applies that update twice to the shared tensor (once through the embedding, once
    through the head), so it is compared against PEFT's unmerged forward, the model that was trained.
    """
    adapter = make_peft_adapter(
        llama_tied, tmp_path / "adapter", target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True
    )
    out = tmp_path / "merged"
    report = lorafuse.merge(llama_tied, [adapter], out, dtype="fp32")
    assert "tie_word_embeddings" not in report.config_updates
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    tensors = read_tensors(out)
    if "lm_head.weight" in tensors:
        torch.testing.assert_close(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"], rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = peft_model(llama_tied, [adapter])
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)


def test_adapter_trained_on_head_class_merges_into_bare_checkpoint(bert_bare, tmp_path):
    """The reverse key match: adapter names carry ``bert.`` (trained on BertForMaskedLM), the checkpoint does not."""
    from transformers import AutoModelForMaskedLM

    adapter = make_peft_adapter(
        bert_bare,
        tmp_path / "adapter",
        model_cls=AutoModelForMaskedLM,
        target_modules=["query", "value"],
        bias="lora_only",
    )
    out = tmp_path / "merged"
    lorafuse.merge(bert_bare, [adapter], out, dtype="fp32")
    expected = peft_merged(bert_bare, [adapter], model_cls=AutoModelForMaskedLM).bert
    merged = load_model(out, AutoModel)
    ids = input_ids()
    torch.testing.assert_close(_outputs(merged, ids), _outputs(expected, ids), rtol=1e-5, atol=1e-5)
    expected_sd, base = expected.state_dict(), read_tensors(bert_bare)
    ours = read_tensors(out)
    assert set(ours) == set(base)
    for key, tensor in ours.items():
        if key.startswith("pooler."):  # BertForMaskedLM has no pooler: untouched
            assert torch.equal(tensor, base[key]), key
        else:
            torch.testing.assert_close(tensor, expected_sd[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(
        ours["encoder.layer.0.attention.self.query.bias"], base["encoder.layer.0.attention.self.query.bias"]
    )


def test_modules_to_save_weight_moves_part_of_the_way(llama_untied, tmp_path):
    """A decision PEFT has no equivalent for: --weight w on a modules_to_save tensor gives base + w * (saved - base)."""
    adapter = make_peft_adapter(
        llama_untied, tmp_path / "adapter", target_modules=["v_proj"], modules_to_save=["lm_head"]
    )
    out = tmp_path / "merged"
    lorafuse.merge(llama_untied, [adapter], out, weights=[0.25], dtype="fp32")
    base = read_tensors(llama_untied)["lm_head.weight"]
    saved = peft_merged(llama_untied, [adapter]).state_dict()["lm_head.weight"]
    torch.testing.assert_close(read_tensors(out)["lm_head.weight"], base + 0.25 * (saved - base), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fixture", ["llama_untied", "gpt2"])
def test_row_block_merge_matches_peft(fixture, request, tmp_path, monkeypatch):
    """The kernel merges big tensors in row blocks; shrink the block so tiny tensors split (unevenly) too."""
    from lorafuse.engine import kernel
    from lorafuse.io.checkpoint import Checkpoint

    monkeypatch.setattr(kernel, "ROW_BLOCK_BYTES", 2600)  # 32 columns: blocks of ~20 rows
    base_dir = request.getfixturevalue(fixture)
    reads: list[tuple[int, int]] = []  # (tensor bytes, bytes read): row blocks, so memory per math thread is a block
    read = Checkpoint.elements

    def counting_read(self, name, *args, **kwargs):
        values = read(self, name, *args, **kwargs)
        if self.files[0].parent == base_dir:  # the base's tensors, not the adapter's
            reads.append((self.infos[name].nbytes, values.nbytes))
        return values

    monkeypatch.setattr(Checkpoint, "elements", counting_read)
    if fixture == "gpt2":
        kwargs = dict(target_modules=["c_attn", "c_fc", "c_proj", "wte"], fan_in_fan_out=True)
    else:
        kwargs = dict(target_modules=["embed_tokens", "lm_head", *LLAMA_ALL])
    adapter = make_peft_adapter(base_dir, tmp_path / "adapter", **kwargs)
    split, whole = tmp_path / "split", tmp_path / "whole"
    lorafuse.merge(base_dir, [adapter], split, dtype="fp32")
    monkeypatch.undo()
    partial = [got for total, got in reads if got < total]  # tensors too wide for 16 rows a block are read whole
    assert partial and max(partial) <= 2 * 2600
    lorafuse.merge(base_dir, [adapter], whole, dtype="fp32")
    ours, reference = read_tensors(split), read_tensors(whole)
    expected = peft_merged(base_dir, [adapter]).state_dict()
    for key, tensor in ours.items():
        assert torch.equal(tensor, reference[key]), key
        if key != "lm_head.weight":  # tied GPT-2 head: PEFT's merge moves it with wte (see the tie tests)
            torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_tied_encoder_head_with_another_name_stays_tied(bert, tmp_path):
    """BERT's MLM head (cls.predictions.decoder) is tied to the word embeddings under a name other than lm_head:
    writing lm_head.weight and untying would leave that head random, so it stays tied as in PEFT's merge."""
    from transformers import AutoModelForMaskedLM

    adapter = make_peft_adapter(
        bert, tmp_path / "adapter", model_cls=AutoModelForMaskedLM, target_modules=["word_embeddings", "query"]
    )
    out = tmp_path / "merged"
    report = lorafuse.merge(bert, [adapter], out, dtype="fp32")
    assert report.config_updates == {}
    assert [w for w in report.warnings if "word_embeddings" in w and "moves with it" in w]
    assert set(read_tensors(out)) == set(read_tensors(bert))
    merged = load_model(out, AutoModelForMaskedLM)
    expected = peft_merged(bert, [adapter], model_cls=AutoModelForMaskedLM)
    ids = input_ids()
    torch.testing.assert_close(_outputs(merged, ids), _outputs(expected, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fixture", "targets", "saved_flag"),
    [
        ("gpt2", ["c_attn", "c_proj"], False),  # Conv1D layers (c_proj is square) with the flag left off
        ("llama_untied", ["q_proj", "up_proj"], True),  # Linear layers (q_proj is square) with the flag set
    ],
    ids=["conv1d-flag-off", "linear-flag-on"],
)
def test_fan_in_fan_out_follows_the_layer_as_peft_does(fixture, targets, saved_flag, request, tmp_path):
    """PEFT orients each LoRA by its layer's class whatever fan_in_fan_out says; square weights show the difference."""
    base_dir = request.getfixturevalue(fixture)
    adapter = make_peft_adapter(base_dir, tmp_path / "adapter", target_modules=targets, fan_in_fan_out=not saved_flag)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["fan_in_fan_out"] = saved_flag  # as other tools (and hand edits) save it
    config_path.write_text(json.dumps(config))

    out = tmp_path / "merged"
    lorafuse.merge(base_dir, [adapter], out, dtype="fp32")
    expected = peft_merged(base_dir, [adapter])
    ids = input_ids()
    torch.testing.assert_close(_outputs(load_model(out), ids), _outputs(expected, ids), rtol=1e-5, atol=1e-5)
    square = "transformer.h.0.attn.c_proj.weight" if fixture == "gpt2" else "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(read_tensors(out)[square], expected.state_dict()[square], rtol=1e-5, atol=1e-6)
