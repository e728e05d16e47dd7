"""The merged model's README.md: a card for the merged model (base, adapters with weights and sha256, dtype,
lorafuse version), keeping the base card's license/metadata header, with ``base_model`` set to the base.

The card is read back with huggingface_hub's own model-card parser (what the Hub reads), not with ours.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest
from helpers import make_peft_adapter
from huggingface_hub import ModelCard

import lorafuse

BASE_CARD = """---
# a comment the base's authors left
license: apache-2.0
language:
- en
- fr
tags: [text-generation, "tiny test"]
base_model: someone/the-base-of-the-base
model-index:
- name: tiny
  results:
  - task: {type: text-generation}
    metrics:
    - {type: accuracy, value: 0.99}
pipeline_tag: text-generation
---

# Tiny

A tiny model that scores 0.99 on everything.
"""


@pytest.fixture(scope="module")
def adapter(llama_untied, tmp_path_factory):
    return make_peft_adapter(llama_untied, tmp_path_factory.mktemp("card") / "adapter", target_modules=["q_proj"])


def _base_in_hub_cache(llama_untied, tmp_path, card: str | None):
    """The base as huggingface_hub's cache lays out a download of ``org/tiny-llama``."""
    base = shutil.copytree(llama_untied, tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "abc123")
    if card is not None:
        (base / "README.md").write_text(card)
    return base


def test_card_describes_the_merge_and_keeps_the_base_metadata(llama_untied, adapter, tmp_path):
    base = _base_in_hub_cache(llama_untied, tmp_path, BASE_CARD)
    out = tmp_path / "merged"
    lorafuse.merge(base, [adapter], out, weights=[0.5], dtype="bf16")
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["language"] == ["en", "fr"]
    assert data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == "org/tiny-llama"  # the base itself, not the base's own base
    assert data["tags"] == ["text-generation", "tiny test", "lorafuse"]
    assert "model-index" not in data and "eval_results" not in data  # the base's scores are not the merged model's
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert digest in card.text and str(adapter) in card.text
    assert "| 0.5 |" in card.text and "dtype: bfloat16" in card.text and lorafuse.__version__ in card.text
    assert "0.99 on everything" not in card.text  # the base's description is not copied as the merged model's


def test_card_without_a_base_card_and_a_local_base(llama_untied, adapter, tmp_path):
    out = tmp_path / "merged"
    lorafuse.merge(llama_untied, [adapter], out)
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict() == {"tags": ["lorafuse"]}  # no Hub id known for a plain local folder: none invented
    assert str(llama_untied) in card.text and "auto" in card.text


def test_card_tags_in_block_form_and_the_same_card_for_the_same_inputs(llama_untied, adapter, tmp_path):
    base = _base_in_hub_cache(llama_untied, tmp_path, "---\ntags:\n  - lorafuse\n  - chat\nlicense: mit\n---\nx\n")
    lorafuse.merge(base, [adapter], tmp_path / "a")
    lorafuse.merge(base, [adapter], tmp_path / "b")
    data = ModelCard.load(tmp_path / "a" / "README.md").data.to_dict()
    assert data["tags"] == ["lorafuse", "chat"] and data["license"] == "mit"
    assert (tmp_path / "a" / "README.md").read_bytes() == (tmp_path / "b" / "README.md").read_bytes()


def test_dry_run_writes_no_card(llama_untied, adapter, tmp_path):
    report = lorafuse.merge(llama_untied, [adapter], tmp_path / "merged", dry_run=True)
    assert not (tmp_path / "merged").exists() and "README.md" not in report.copied_files


def test_base_model_is_a_hub_id_only_where_the_base_has_one(tmp_path):
    from lorafuse.writers.model_card import hub_id

    assert hub_id({"kind": "hf", "source": "hf://org/name@v1"}, str(tmp_path)) == "org/name"
    assert hub_id({"kind": "hf", "source": "org/name"}, str(tmp_path)) == "org/name"
    assert hub_id({"kind": "ms", "source": "ms://org/name"}, str(tmp_path)) is None  # a ModelScope id is not one
    assert hub_id({"kind": "local", "source": "x"}, str(tmp_path / "x")) is None
