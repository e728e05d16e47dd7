"""PEFT trainable tokens (trainable_token_indices): the saved rows replace the embedding's rows, as PEFT merges."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import input_ids, load_model, make_peft_adapter, peft_merged, read_tensors

import lorafuse
from lorafuse.errors import AdapterError
from lorafuse.verify import verify

EMB = "model.embed_tokens.weight"


@pytest.mark.parametrize("indices", [[1, 5, 7], {"embed_tokens": [2, 3, 100]}], ids=["list", "dict"])
@pytest.mark.parametrize("fixture", ["llama_untied", "llama_tied"])
def test_trainable_tokens_merge_like_peft(fixture, indices, request, tmp_path):
    base = request.getfixturevalue(fixture)
    adapter = make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], trainable_token_indices=indices)
    report = lorafuse.merge(base, [adapter], tmp_path / "merged", dtype="fp32")
    expected = peft_merged(base, [adapter])
    ids = input_ids()
    ids[0, :3] = torch.tensor([1, 2, 5])  # trained tokens
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "merged")(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5
        )
    merged, original = read_tensors(tmp_path / "merged"), read_tensors(base)
    rows = indices if isinstance(indices, list) else indices["embed_tokens"]
    changed = (merged[EMB] != original[EMB]).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(rows)  # exactly the trained rows moved
    torch.testing.assert_close(merged[EMB], expected.state_dict()[EMB], rtol=0, atol=0)
    # A tied pair stays tied: PEFT ties the token rows to the head, so both moved in training.
    assert ("lm_head.weight" in merged) == (fixture == "llama_untied")
    assert not any("tie_word_embeddings" in w for w in report.warnings)
    assert verify(tmp_path / "merged", base, [adapter]).passed


def test_trainable_tokens_need_their_indices(llama_untied, tmp_path):
    adapter = make_peft_adapter(
        llama_untied, tmp_path / "adapter", target_modules=["q_proj"], trainable_token_indices=[1]
    )
    config = adapter / "adapter_config.json"
    config.write_text(
        config.read_text().replace('"trainable_token_indices": [\n    1\n  ]', '"trainable_token_indices": null')
    )
    assert '"trainable_token_indices": null' in config.read_text()
    with pytest.raises(AdapterError, match="trainable_token_indices"):
        lorafuse.merge(llama_untied, [adapter], tmp_path / "merged")


def test_inspect_lists_trained_tokens_and_combine_refuses_them(llama_untied, tmp_path, capsys):
    from lorafuse.cli import main

    adapter = make_peft_adapter(
        llama_untied, tmp_path / "adapter", target_modules=["q_proj"], trainable_token_indices=[4]
    )
    assert main(["inspect", str(adapter), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["modules"]
    assert [r["tokens"] for r in rows if r["kind"] == "tokens"] == [[4]]
    assert main(["combine", str(adapter), str(adapter), "-o", str(tmp_path / "both")]) == 1
    assert "trainable tokens" in capsys.readouterr().err


def token_adapter(base, out, indices, seed):
    return make_peft_adapter(base, out, target_modules=["q_proj"], trainable_token_indices=indices, seed=seed)


def peft_merged_both(base, first, second):
    """PEFT's merge of two token adapters loaded together (set_adapter takes one token adapter at a time, so both
    are merged by name, as merge_and_unload(adapter_names=...) does)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), first, adapter_name="a0")
    model.load_adapter(second, adapter_name="a1")
    return model.merge_and_unload(adapter_names=["a0", "a1"]).eval()


def test_overlapping_trainable_tokens_of_two_adapters_are_refused_as_peft_refuses(llama_untied, tmp_path, capsys):
    from lorafuse.cli import main

    first = token_adapter(llama_untied, tmp_path / "first", [1, 5, 7], seed=1)
    second = token_adapter(llama_untied, tmp_path / "second", [7, 9], seed=2)
    with pytest.raises(ValueError, match="disjunct token indices"):  # the oracle: PEFT's merge refuses them
        peft_merged_both(llama_untied, first, second)
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", str(llama_untied), str(first), str(second), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "token 7" in err and EMB in err and "overlap" in err
    assert not out.exists()


def test_disjoint_trainable_tokens_of_two_adapters_merge_like_peft(llama_untied, tmp_path):
    first = token_adapter(llama_untied, tmp_path / "first", [1, 5], seed=1)
    second = token_adapter(llama_untied, tmp_path / "second", [7, 9], seed=2)
    lorafuse.merge(llama_untied, [first, second], tmp_path / "merged", dtype="fp32")
    expected = peft_merged_both(llama_untied, first, second).state_dict()
    merged = read_tensors(tmp_path / "merged")
    torch.testing.assert_close(merged[EMB], expected[EMB], rtol=0, atol=0)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q_proj], expected[q_proj], rtol=1e-5, atol=1e-6)
