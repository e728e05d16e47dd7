"""names/: the prefix map, kohya's flattened names and layout detection."""

from __future__ import annotations

import pytest

from lorafuse.errors import AdapterError
from lorafuse.names import KohyaNames, PrefixMap, layout_of
from lorafuse.names.kohya import flatten

BERT = ["bert.encoder.layer.0.attention.self.query.weight", "cls.predictions.decoder.weight"]


def test_prefix_map_matches_across_head_prefixes():
    names = PrefixMap(BERT)
    assert names.resolve("encoder.layer.0.attention.self.query.weight") == BERT[0]  # base has the longer name
    assert names.resolve("model.bert.encoder.layer.0.attention.self.query.weight") == BERT[0]  # adapter has it
    assert names.resolve(BERT[1]) == BERT[1]
    assert names.resolve("encoder.layer.1.weight") is None


def test_prefix_map_refuses_to_guess_between_candidates():
    names = PrefixMap(["text_encoder.a.weight", "text_encoder_2.a.weight"])
    assert names.resolve("a.weight") is None
    assert names.ambiguous("a.weight") == ["text_encoder.a.weight", "text_encoder_2.a.weight"]


def test_kohya_names_unflatten_against_the_base():
    names = KohyaNames(["unet.down_blocks.0.attn1.to_q.weight", "text_encoder.layers.0.q_proj.weight"])
    assert names.resolve("lora_unet_down_blocks_0_attn1_to_q", "k") == "unet.down_blocks.0.attn1.to_q"
    assert names.resolve("lora_te_layers_0_q_proj", "k") == "text_encoder.layers.0.q_proj"
    assert names.resolve("lora_unet_missing", "k") == "lora_unet_missing"  # left to the plan to refuse


def test_kohya_part_hints_pick_the_text_encoder():
    names = KohyaNames(["text_encoder.layers.0.q.weight", "text_encoder_2.layers.0.q.weight"])
    assert names.resolve("lora_te1_layers_0_q", "k") == "text_encoder.layers.0.q"
    assert names.resolve("lora_te2_layers_0_q", "k") == "text_encoder_2.layers.0.q"
    with pytest.raises(AdapterError, match="matches several base tensors"):
        names.resolve("lora_x_layers_0_q", "k")


def test_flatten_is_what_kohya_names_resolve():
    module = "down_blocks.0.attentions.0.proj_in"
    assert flatten(module) == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert KohyaNames([f"{module}.weight"]).resolve(flatten(module), "k") == module


def test_layout_of_gives_the_generic_layout_and_its_maps():
    layout = layout_of(BERT, {"model_type": "bert"})
    assert layout.name == "generic"
    assert layout.resolve("encoder.layer.0.attention.self.query.weight") == BERT[0]
    assert layout.kohya.resolve("lora_te_bert_encoder_layer_0_attention_self_query", "k") == BERT[0].rpartition(".")[0]
