"""HF -> GGUF: the transformers architectures lorafuse writes as GGUF, and for each the facts llama.cpp's
``convert_hf_to_gguf.py`` applies (read from llama.cpp's converter, not imported from it): the GGUF architecture,
the tensor names (the ``gguf`` package's own name map, llama.cpp's data), the q/k row order of rope models, which
tensors stay float32, and the order in which tokenizer files are tried.

An architecture not listed here is refused with one line before any work (:func:`gguf_arch_of`): a guessed
conversion would load in llama.cpp and produce wrong text.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import LorafuseError

GGUF_EXTRA = "pip install 'lorafuse[gguf]'"


def require_gguf() -> ModuleType:
    """The ``gguf`` package (llama.cpp's gguf-py), or a one-line error naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise LorafuseError(f"GGUF files need the gguf package: {GGUF_EXTRA}") from None
    return gguf


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture becomes GGUF (as llama.cpp's converter does it).

    ``arch``: the ``gguf.MODEL_ARCH`` member; ``permute_qk``: q/k rows reordered per head (llama.cpp's rope pairs
    adjacent values, transformers' rotates halves); ``vocab``: tokenizer readers tried in order, the first whose
    file exists is used; ``llama_params``: writes ``vocab_size`` and the rope dimension count; ``pooling``: a
    sentence-transformers pooling type is recorded when the folder has one; ``params``: which hyperparameter set
    is written (gguf_header.py: the generic text model's, or an architecture's own); ``norm_shift``: added to
    every ``*norm.weight`` (Gemma's RMSNorm scales by 1 + weight, llama.cpp's by weight); ``dropped``: checkpoint
    tensors the converter leaves out; ``space_prefix``: the ``add_space_prefix`` written after a SentencePiece
    tokenizer; ``real_vocab``: the embedding keeps only the rows the tokenizer has (Gemma3). A GGUF of each is
    read back under transformers names (HF_MODULES below), its norm shift taken off.
    """

    arch: str
    permute_qk: bool = False
    vocab: tuple[str, ...] = ("sentencepiece", "gpt2")
    llama_params: bool = False
    pooling: bool = False
    params: str = "text"
    norm_shift: float = 0.0
    dropped: tuple[str, ...] = ()
    space_prefix: bool | None = None
    real_vocab: bool = False


_LLAMA = GGUFArch("LLAMA", permute_qk=True, vocab=("sentencepiece", "llama_hf", "gpt2"), llama_params=True)

# transformers ``architectures[0]`` -> conversion. Only dense text models whose every step is implemented here.
ARCHITECTURES: dict[str, GGUFArch] = {
    "LlamaForCausalLM": _LLAMA,
    "LLaMAForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": GGUFArch("QWEN2", pooling=True),
    "Qwen3ForCausalLM": GGUFArch("QWEN3", pooling=True),
    "Gemma2ForCausalLM": GGUFArch(
        "GEMMA2",
        vocab=("sentencepiece",),
        params="gemma2",
        norm_shift=1.0,
        dropped=("lm_head.weight",),  # tied to the embedding in llama.cpp's gemma2
        space_prefix=False,
    ),
    "Gemma3ForCausalLM": GGUFArch("GEMMA3", params="gemma3", norm_shift=1.0, space_prefix=False, real_vocab=True),
    # fused qkv_proj / gate_up_proj are llama.cpp's attn_qkv / ffn_up as they are; long-context models get
    # generated rope-factor tensors (gguf_header.phi3_rope_factors)
    "Phi3ForCausalLM": GGUFArch("PHI3", vocab=("phi3",), params="phi3"),
}

# Tensors the converter keeps in float32 whatever the output type (beyond 1-D tensors, norms and biases); the
# subset that exists in the architectures above.
F32_TENSORS = ("FFN_GATE_INP", "POS_EMBD", "TOKEN_TYPES")
# Tensors the converter writes as F16 when the output type is ternary (TQ1_0/TQ2_0).
F16_WITH_TERNARY = ("TOKEN_EMBD", "OUTPUT")
# Tensors the converter drops (buffers, not weights).
DROPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def gguf_arch_of(config: dict[str, Any] | None, where: str = "config.json") -> GGUFArch:
    """The conversion of the model ``config`` describes; a one-line error naming the architecture otherwise."""
    archs = (config or {}).get("architectures") or []
    name = archs[0] if archs else None
    if name is None:
        raise LorafuseError(f"{where} names no architecture: GGUF output needs one of {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES.get(name)
    if spec is None:
        raise LorafuseError(
            f"lorafuse cannot write architecture {name} as GGUF (it writes {', '.join(ARCHITECTURES)}): merge to "
            "safetensors and run llama.cpp's convert_hf_to_gguf.py"
        )
    if config.get("vocab_size") == 32016:
        raise LorafuseError(
            f"{where}: a CodeLlama vocabulary (32016 tokens, infill tokens) is not implemented for GGUF output: "
            "merge to safetensors and run llama.cpp's convert_hf_to_gguf.py"
        )
    return spec


@lru_cache(maxsize=8)
def _name_map(arch: str, blocks: int) -> Any:
    gguf = require_gguf()
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), blocks)


def gguf_tensor_name(spec: GGUFArch, blocks: int, hf_name: str) -> str | None:
    """The GGUF name of checkpoint tensor ``hf_name``; None for a tensor the converter drops. A one-line error for
    one it cannot name (the converter would stop there too)."""
    if hf_name.endswith(DROPPED_SUFFIXES) or hf_name in spec.dropped:
        return None
    name = hf_name.replace("language_model.", "")  # as the converter reads multimodal-wrapped text models
    mapped = _name_map(spec.arch, blocks).get_name(key=name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise LorafuseError(f"tensor {hf_name} has no GGUF name in llama.cpp's {spec.arch.lower()} architecture")
    return mapped


def is_tensor(spec: GGUFArch, gguf_name: str, key: str, block: int | None) -> bool:
    """True when ``gguf_name`` is the ``key`` (a ``gguf.MODEL_TENSOR`` member name) tensor of layer ``block``."""
    gguf = require_gguf()
    member = getattr(gguf.MODEL_TENSOR, key)
    if member not in gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, spec.arch)]:
        return False
    template = gguf.TENSOR_NAMES[member]
    if ("{bid}" in template) != (block is not None):
        return False
    return gguf_name == template.format(bid=block) + ".weight"


def norm_shift(spec: GGUFArch, hf_name: str) -> float:
    """What the converter adds to checkpoint tensor ``hf_name`` (Gemma's norms), 0 for the rest."""
    return spec.norm_shift if hf_name.endswith("norm.weight") else 0.0


def block_of(hf_name: str) -> int | None:
    """The layer index of a tensor name: its first all-digit part (as the converter reads it)."""
    return next((int(part) for part in hf_name.split(".") if part.isdecimal()), None)


def qk_heads(spec: GGUFArch, hf_name: str, config: dict[str, Any]) -> int | None:
    """The head count whose row order the q/k permutation reorders for ``hf_name``; None for other tensors."""
    if not spec.permute_qk:
        return None
    heads = config.get("n_heads", config.get("num_attention_heads"))
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return int(heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return int(config.get("n_kv_heads", config.get("num_key_value_heads", heads)))
    return None


def qk_row_order(rows: int, heads: int) -> np.ndarray:
    """``order[r]``: the source row of GGUF row ``r``. Within each head, transformers keeps the two rotated halves
    apart (rows ``0..d/2`` and ``d/2..d``); llama.cpp wants them interleaved (row ``2j`` from ``j``, ``2j+1`` from
    ``d/2 + j``)."""
    if rows % (2 * heads):
        raise LorafuseError(f"{rows} q/k rows do not split into {heads} heads of two rotary halves")
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, 2, half).swapaxes(1, 2).reshape(rows)


# GGUF -> transformers names, for reading a GGUF base: ``gguf.MODEL_TENSOR`` member -> the transformers module
# of the architectures above (the Llama layout; HF_MODULES_OF: where an architecture's modules differ).
HF_MODULES: dict[str, str] = {
    "TOKEN_EMBD": "model.embed_tokens",
    "OUTPUT_NORM": "model.norm",
    "OUTPUT": "lm_head",
    "ATTN_NORM": "model.layers.{bid}.input_layernorm",
    "ATTN_Q": "model.layers.{bid}.self_attn.q_proj",
    "ATTN_K": "model.layers.{bid}.self_attn.k_proj",
    "ATTN_V": "model.layers.{bid}.self_attn.v_proj",
    "ATTN_OUT": "model.layers.{bid}.self_attn.o_proj",
    "ATTN_Q_NORM": "model.layers.{bid}.self_attn.q_norm",
    "ATTN_K_NORM": "model.layers.{bid}.self_attn.k_norm",
    "FFN_NORM": "model.layers.{bid}.post_attention_layernorm",
    "FFN_GATE": "model.layers.{bid}.mlp.gate_proj",
    "FFN_UP": "model.layers.{bid}.mlp.up_proj",
    "FFN_DOWN": "model.layers.{bid}.mlp.down_proj",
}
_GEMMA_NORMS = {  # Gemma's four norms a layer: post_attention_layernorm is after attention, not before the MLP
    "ATTN_POST_NORM": "model.layers.{bid}.post_attention_layernorm",
    "FFN_PRE_NORM": "model.layers.{bid}.pre_feedforward_layernorm",  # named ffn_norm, as FFN_NORM is
    "FFN_POST_NORM": "model.layers.{bid}.post_feedforward_layernorm",
}
HF_MODULES_OF: dict[str, dict[str, str]] = {
    "GEMMA2": _GEMMA_NORMS,
    "GEMMA3": _GEMMA_NORMS,
    # Phi-3 keeps its fused projections fused: attn_qkv is qkv_proj, ffn_up is gate_up_proj (no ffn_gate)
    "PHI3": {"ATTN_QKV": "model.layers.{bid}.self_attn.qkv_proj", "FFN_UP": "model.layers.{bid}.mlp.gate_up_proj"},
}


def gguf_arch_named(arch: str, where: str) -> GGUFArch:
    """The conversion behind a GGUF file's ``general.architecture``; a one-line error for one not listed."""
    by_name = {spec.arch.lower(): spec for spec in ARCHITECTURES.values()}
    spec = by_name.get(arch)
    if spec is None:
        raise LorafuseError(
            f"{where}: lorafuse cannot map GGUF architecture {arch or '(none)'} to transformers names (it maps "
            f"{', '.join(sorted(by_name))})"
        )
    return spec


def hf_architecture(spec: GGUFArch) -> str:
    """The transformers architecture a GGUF of conversion ``spec`` came from (the first listed)."""
    return next(name for name, s in ARCHITECTURES.items() if s is spec)


def hf_names(spec: GGUFArch, blocks: int) -> dict[str, str]:
    """GGUF tensor name -> transformers name, for every weight and bias of ``blocks`` layers: the inverse of the
    name map the converter writes with (an entry is kept only where that map sends the transformers name back to
    the GGUF name, so reading and writing cannot disagree)."""
    gguf = require_gguf()
    known = gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, spec.arch)]
    forward = _name_map(spec.arch, blocks)
    names = {}
    for key, module in {**HF_MODULES, **HF_MODULES_OF.get(spec.arch, {})}.items():
        member = getattr(gguf.MODEL_TENSOR, key)
        if member not in known:
            continue
        template = gguf.TENSOR_NAMES[member]
        for bid in range(blocks) if "{bid}" in template else [None]:
            for suffix in (".weight", ".bias"):
                hf = module.format(bid=bid) + suffix
                if forward.get_name(key=hf, try_suffixes=(".weight", ".bias")) == template.format(bid=bid) + suffix:
                    names[template.format(bid=bid) + suffix] = hf
    return names


def qk_heads_of_gguf(heads: Any, kv_heads: Any) -> dict[str, int]:
    """The head counts q (``attn_q``) and k (``attn_k``) rows were reordered by, from a GGUF's metadata."""
    if not isinstance(heads, int) or not isinstance(kv_heads if kv_heads is not None else heads, int):
        raise LorafuseError(f"per-layer head counts ({heads}, {kv_heads}) are not implemented for GGUF bases")
    return {"attn_q": heads, "attn_k": kv_heads if kv_heads is not None else heads}
