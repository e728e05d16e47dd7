"""vLLM's LoRA rules (lorafuse.serving) against a table read from vLLM 0.33.0's source.

The tables below were copied by hand from the vLLM 0.33.0 wheel (``pip download --no-deps vllm==0.33.0``), not from
lorafuse: each entry names the file it comes from. A rule lorafuse holds differently from vLLM fails here.
"""

from __future__ import annotations

import pytest

from lorafuse.errors import LorafuseError
from lorafuse.serving import (
    VLLM_ARCHITECTURES,
    VLLM_DEFAULT_MAX_LORA_RANK,
    VLLM_MAX_LORA_RANKS,
    VLLM_VERSION,
    check_max_lora_rank,
    check_vllm,
)

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]; max_lora_rank = 16.
MAX_LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512]
DEFAULT_MAX_LORA_RANK = 16

# vllm/lora/peft_helper.py, PEFTHelper._validate_features / validate_legal: config values vLLM refuses.
REFUSED = [
    ("use_dora", True),
    ("lora_bias", True),
    ("alora_invocation_tokens", [5, 6]),
    ("layer_replication", [[0, 1]]),
    ("use_bdlora", {"lora_a": True}),
    ("use_qalora", True),
    ("bias", "all"),
    ("bias", "lora_only"),
    ("init_lora_weights", "pissa"),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "corda"),
    ("modules_to_save", ["lm_head"]),
    ("modules_to_save", ["model.norm"]),
]
# ... and values it accepts.
ACCEPTED = [
    ("init_lora_weights", True),
    ("init_lora_weights", False),
    ("init_lora_weights", "gaussian"),
    ("init_lora_weights", "eva"),
    ("init_lora_weights", "orthogonal"),
    ("init_lora_weights", "mica"),
    ("init_lora_weights", "lora_ga"),
    ("modules_to_save", None),
    ("modules_to_save", ["score"]),
    ("modules_to_save", ["classifier"]),
    ("use_rslora", True),
]

# Module names an adapter may hold LoRAs for: the model's linear layers with packed_modules_mapping expanded
# (vllm/lora/worker_manager.py, _load_adapter) plus embedding_modules (vllm/lora/utils.py,
# get_supported_lora_modules), read from each model file.
ATTENTION_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ADAPTER_MODULES = {
    # vllm/model_executor/models/llama.py: qkv_proj, o_proj, gate_up_proj, down_proj; embedding_modules
    # {"embed_tokens", "lm_head"}
    "LlamaForCausalLM": ATTENTION_MLP | {"embed_tokens", "lm_head"},
    # vllm/model_executor/models/mistral.py: MistralForCausalLM(LlamaForCausalLM), embedding_modules = {}
    "MistralForCausalLM": ATTENTION_MLP,
    # vllm/model_executor/models/qwen2.py: packed_modules_mapping only (SupportsLoRA's embedding_modules = {})
    "Qwen2ForCausalLM": ATTENTION_MLP,
    # vllm/model_executor/models/qwen3.py: packed_modules_mapping and embedding_modules as Llama
    "Qwen3ForCausalLM": ATTENTION_MLP | {"embed_tokens", "lm_head"},
    # vllm/model_executor/models/phi3.py: {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}, Llama's
    # embedding_modules
    "Phi3ForCausalLM": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"},
    # vllm/model_executor/models/gemma.py, gemma2.py: packed_modules_mapping only
    "GemmaForCausalLM": ATTENTION_MLP,
    "Gemma2ForCausalLM": ATTENTION_MLP,
}

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128}
P = "base_model.model.model.layers.0."


def lora_config(**overrides):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}
    return {**config, **overrides}


def lora_tensors(*modules: str, rank: int = 8) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for module in modules:
        shapes[f"{module}.lora_A.weight"] = (rank, 32)
        shapes[f"{module}.lora_B.weight"] = (32, rank)
    return shapes


def verdict(config, shapes=None, base=LLAMA, max_lora_rank=16, files=("adapter_model.safetensors",)):
    shapes = lora_tensors(P + "self_attn.q_proj") if shapes is None else shapes
    return check_vllm(config, shapes, list(files), base, max_lora_rank)


def failed(v) -> list[str]:
    return [f.rule for f in v.findings if f.ok is False]


def test_the_version_and_ranks_are_vllms():
    assert VLLM_VERSION == "0.33.0"
    assert list(VLLM_MAX_LORA_RANKS) == MAX_LORA_RANKS and VLLM_DEFAULT_MAX_LORA_RANK == DEFAULT_MAX_LORA_RANK
    for rank in MAX_LORA_RANKS:
        assert check_max_lora_rank(rank) == rank
    for rank in (0, 4, 12, 24, 1024):
        with pytest.raises(LorafuseError, match=f"--max-lora-rank {rank}: vLLM 0.33.0 accepts only 1, 8, 16"):
            check_max_lora_rank(rank)


def test_a_plain_lora_is_servable():
    v = verdict(lora_config())
    assert v.servable is True and failed(v) == []
    assert v.to_dict()["servable"] is True and v.to_dict()["version"] == "0.33.0"


@pytest.mark.parametrize(("key", "value"), REFUSED)
def test_refused_features(key, value):
    v = verdict(lora_config(**{key: value}))
    assert v.servable is False and failed(v) == [key]
    finding = next(f for f in v.findings if f.rule == key)
    assert finding.fix  # every failing rule says what to do


@pytest.mark.parametrize(("key", "value"), ACCEPTED)
def test_accepted_values(key, value):
    assert verdict(lora_config(**{key: value})).servable is True


def test_rank_against_max_lora_rank_counts_the_rank_pattern():
    # validate_legal: max(r, *rank_pattern.values()) > max_lora_rank is refused.
    assert verdict(lora_config(r=16)).servable is True
    v = verdict(lora_config(r=8, rank_pattern={"q_proj": 32}))
    assert failed(v) == ["rank"]
    assert next(f for f in v.findings if f.rule == "rank").fix == "serve with --max-lora-rank 32"
    assert verdict(lora_config(r=8, rank_pattern={"q_proj": 32}), max_lora_rank=32).servable is True
    assert failed(verdict(lora_config(r=600), max_lora_rank=512)) == ["rank"]


@pytest.mark.parametrize("architecture", sorted(ADAPTER_MODULES))
def test_target_modules_per_architecture(architecture):
    assert sorted(VLLM_ARCHITECTURES[architecture].adapter_modules()) == sorted(ADAPTER_MODULES[architecture])
    base = {"architectures": [architecture], "vocab_size": 128}
    for leaf in sorted(ADAPTER_MODULES[architecture] - {"embed_tokens"}):
        assert verdict(lora_config(), lora_tensors(P + leaf), base).servable is True, leaf
    # from_local_checkpoint: a module whose last name is not expected raises "expected target modules in ...".
    for leaf in ("lm_head", "embed_tokens", "qkv_proj", "c_attn", "input_layernorm"):
        if leaf not in ADAPTER_MODULES[architecture]:
            assert failed(verdict(lora_config(), lora_tensors(P + leaf), base)) == ["target modules"], leaf
    assert sorted(VLLM_ARCHITECTURES) == sorted(ADAPTER_MODULES)


def test_an_architecture_without_rules_cannot_be_told():
    v = verdict(lora_config(), base={"architectures": ["GPT2LMHeadModel"]})
    assert v.servable is None and failed(v) == []
    unknown = next(f for f in v.findings if f.ok is None)
    assert unknown.rule == "target modules" and "GPT2LMHeadModel" in unknown.detail
    assert verdict(lora_config(), base=None).servable is None


def test_tensor_names_vllm_cannot_parse():
    # parse_fine_tuned_lora_name: only lora_A/lora_B .weight, lora_embedding_A/B and a classifier head's tensors.
    shapes = {**lora_tensors(P + "self_attn.q_proj"), P + "self_attn.q_proj.lora_B.bias": (32,)}
    assert failed(verdict(lora_config(), shapes)) == ["tensor names"]
    head = {**lora_tensors(P + "self_attn.q_proj"), "base_model.model.score.weight": (3, 32)}
    assert verdict(lora_config(modules_to_save=["score"]), head).servable is True
    base_copy = {**lora_tensors(P + "self_attn.q_proj"), "base_model.model.model.embed_tokens.base_layer.weight": ()}
    assert verdict(lora_config(), base_copy).servable is True  # is_base_embedding_weights: skipped


def test_embedding_lora_must_span_the_base_vocabulary():
    # from_lora_tensors: lora_embedding_A's shape[1] must equal the base's vocabulary size (no extra vocabulary).
    def embedding(vocab):
        e = "base_model.model.model.embed_tokens"
        return {f"{e}.lora_embedding_A": (8, vocab), f"{e}.lora_embedding_B": (32, 8)}

    assert verdict(lora_config(), embedding(128)).servable is True
    assert failed(verdict(lora_config(), embedding(130))) == ["embedding LoRA"]
    assert verdict(lora_config(), embedding(128), base={"architectures": ["LlamaForCausalLM"]}).servable is None


def test_only_peft_folders_with_weights_are_loaded():
    # from_local_checkpoint reads adapter_model.safetensors, .bin or .pt beside adapter_config.json.
    assert failed(verdict(None, {})) == ["format"]
    assert failed(verdict(lora_config(), files=["adapter_config.json"])) == ["format"]
    assert verdict(lora_config(), files=["adapter_model.bin"]).servable is True


@pytest.mark.parametrize("command", ["inspect", "extract"])
def test_max_lora_rank_without_serving_is_refused(tmp_path, capsys, command):
    from lorafuse.cli import main

    args = [command, str(tmp_path), "--max-lora-rank", "32"]
    if command == "extract":
        args = [command, str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out"), "--max-lora-rank", "32"]
    assert main(args) == 1
    assert "--max-lora-rank applies with --serving vllm only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
