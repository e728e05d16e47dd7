"""Adapters trained with added tokens: the resized embedding and head are saved whole (PEFT modules_to_save)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import VOCAB, load_model, make_peft_adapter, read_tensors
from peft import PeftModel
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.errors import ShapeMismatchError
from lorafuse.verify import verify

ADDED = 8


def resized_adapter(base_dir, out_dir, modules_to_save, tokenizer=True):
    model = load_model(base_dir)
    model.resize_token_embeddings(VOCAB + ADDED)
    adapter = make_peft_adapter(
        base_dir, out_dir, module=model, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save
    )
    if tokenizer:
        (adapter / "tokenizer_config.json").write_text(json.dumps({"added_tokens": ADDED}))
    return adapter


@pytest.mark.parametrize(
    ("fixture", "modules_to_save"),
    [("llama_untied", ["embed_tokens", "lm_head"]), ("llama_tied", ["embed_tokens"])],
    ids=["untied", "tied-embedding-only"],  # tied: PEFT saves the resized head too, and lorafuse unties
)
def test_resized_vocabulary_merges_like_peft(fixture, modules_to_save, request, tmp_path):
    base_dir = request.getfixturevalue(fixture)
    adapter = resized_adapter(base_dir, tmp_path / "adapter", modules_to_save)
    report = lorafuse.merge(base_dir, [adapter], tmp_path / "merged", dtype="fp32")
    assert any("vocabulary to 136 tokens" in w for w in report.warnings)
    assert report.config_updates["vocab_size"] == VOCAB + ADDED
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB + ADDED
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text()) == {"added_tokens": ADDED}
    tensors = read_tensors(tmp_path / "merged")
    assert tensors["model.embed_tokens.weight"].shape[0] == VOCAB + ADDED
    assert tensors["lm_head.weight"].shape[0] == VOCAB + ADDED

    oracle = load_model(base_dir)
    oracle.resize_token_embeddings(VOCAB + ADDED)  # its new rows are random: the adapter replaces them whole
    expected = PeftModel.from_pretrained(oracle, adapter).merge_and_unload().eval()
    ids = torch.randint(0, VOCAB + ADDED, (2, 9), generator=torch.Generator().manual_seed(3))
    ids[0, 0] = VOCAB + ADDED - 1  # an added token
    with torch.no_grad():
        got = load_model(tmp_path / "merged")(ids).logits
        want = expected(ids).logits
    assert got.shape[-1] == VOCAB + ADDED
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_sd = expected.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(tensors[name], want_sd[name], rtol=1e-5, atol=1e-6, msg=name)
    # verify recomputes the weights and runs the base, resized like the trained model, with the adapter on the fly.
    check = verify(tmp_path / "merged", base_dir, [adapter])
    assert check.passed and check.output is not None and check.output.ran


def test_resized_vocabulary_without_tokenizer_files_warns(llama_untied, tmp_path):
    """Only embed_tokens in modules_to_save: PEFT saves the resized lm_head too, as its base layer."""
    adapter = resized_adapter(llama_untied, tmp_path / "adapter", ["embed_tokens"], tokenizer=False)
    report = lorafuse.merge(llama_untied, [adapter], tmp_path / "merged")
    assert any("hold no tokenizer files" in w for w in report.warnings)


def test_resizing_only_the_embedding_is_refused(llama_untied, tmp_path):
    adapter = resized_adapter(llama_untied, tmp_path / "adapter", ["embed_tokens"])
    # PEFT itself saves the resized head beside (save_embedding_layers="auto"); an adapter without it:
    weights = adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "lm_head" not in k}
    save_file(tensors, weights)
    with pytest.raises(ShapeMismatchError, match="resize the vocabulary to 136 tokens but leave 'lm_head.weight'"):
        lorafuse.merge(llama_untied, [adapter], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_other_shape_mismatch_of_an_embedding_is_still_the_wrong_base_error(llama_untied, tmp_path):
    adapter = resized_adapter(llama_untied, tmp_path / "adapter", ["embed_tokens", "lm_head"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()  # a different hidden size: not a vocabulary resize
    save_file(tensors, weights)
    with pytest.raises(ShapeMismatchError, match="embed_tokens.*is this the base model"):
        lorafuse.merge(llama_untied, [adapter], tmp_path / "merged")
