"""Shared fixtures: tiny base models built once per test session (read-only; tests write adapters elsewhere)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_bert, make_conv_net, make_gpt2, make_llama  # noqa: E402


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_untied(models_root) -> Path:
    return make_llama(models_root, tie=False)


@pytest.fixture(scope="session")
def llama_tied(models_root) -> Path:
    return make_llama(models_root, tie=True)


@pytest.fixture(scope="session")
def llama_bf16(models_root) -> Path:
    return make_llama(models_root, tie=False, dtype=torch.bfloat16, name="llama-bf16")


@pytest.fixture(scope="session")
def qwen2(models_root) -> Path:
    """Qwen2 has q/k/v biases: the case for trained biases and lora_bias."""
    return make_llama(models_root, model_type="qwen2", tie=False)


@pytest.fixture(scope="session")
def gpt2(models_root) -> Path:
    return make_gpt2(models_root)


@pytest.fixture(scope="session")
def bert(models_root) -> Path:
    return make_bert(models_root)


@pytest.fixture(scope="session")
def bert_bare(models_root) -> Path:
    return make_bert(models_root, head=False)


@pytest.fixture(scope="session")
def conv_net(models_root) -> Path:
    return make_conv_net(models_root)
