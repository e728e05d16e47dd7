"""Two adapters that each carry PEFT's saved copy of a LoRA-wrapped embedding merge like PEFT merges them."""

import torch
from helpers import input_ids, load_model, make_llama, make_peft_adapter, peft_merged

import lorafuse


def test_second_adapters_embedding_copy_keeps_first_adapters_update(tmp_path):
    base = make_llama(tmp_path, tie=False)
    first = make_peft_adapter(base, tmp_path / "a1", seed=1, target_modules=["q_proj", "embed_tokens"])
    second = make_peft_adapter(base, tmp_path / "a2", seed=2, target_modules=["v_proj", "embed_tokens"])
    out = tmp_path / "merged"
    lorafuse.merge(base, [first, second], out, weights=[1.0, 0.5])
    expected = peft_merged(base, [first, second], [1.0, 0.5])
    merged = load_model(out)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
