"""Everything in a GGUF file before its tensor data: the model's hyperparameters, the ``general.*`` metadata, the
tokenizer and the tensor table, recorded as llama.cpp's ``convert_hf_to_gguf.py`` records them for the same model
folder (key for key, through the ``gguf`` package's own writer, so the bytes are encoded as llama.cpp's are).

The output types (``--outtype``): the float types and every type the ``gguf`` package quantizes; the K-quants are
made from an f16 GGUF by llama.cpp's ``llama-quantize``.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LorafuseError
from .gguf_pack import new_writer
from .names.gguf import (
    F16_WITH_TERNARY,
    F32_TENSORS,
    GGUFArch,
    block_of,
    gguf_tensor_name,
    is_tensor,
    norm_shift,
    qk_heads,
    require_gguf,
)

log = logging.getLogger("lorafuse")

# --outtype -> (the file type llama.cpp records, the tensor type of the model's matrices)
OUTTYPES: dict[str, tuple[str, str]] = {
    "f32": ("ALL_F32", "F32"),
    "f16": ("MOSTLY_F16", "F16"),
    "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
    "q4_0": ("MOSTLY_Q4_0", "Q4_0"),
    "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
    "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
    "q5_1": ("MOSTLY_Q5_1", "Q5_1"),
    "tq1_0": ("MOSTLY_TQ1_0", "TQ1_0"),
    "tq2_0": ("MOSTLY_TQ2_0", "TQ2_0"),
}
OUTTYPE_CHOICES = ("auto", *OUTTYPES)

# The hyperparameters every text model records: (GGUFWriter method, config keys tried in order), as the converter.
TEXT_PARAMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("add_context_length", ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                            "model_max_length")),
    ("add_embedding_length", ("hidden_size", "n_embd", "dim")),
    ("add_feed_forward_length", ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                                 "n_inner", "hidden_dim")),
    ("add_head_count", ("num_attention_heads", "n_head", "n_heads")),
    ("add_head_count_kv", ("num_key_value_heads", "n_kv_heads")),
)  # fmt: skip
NORM_PARAMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("add_layer_norm_rms_eps", ("rms_norm_eps", "norm_eps")),
    ("add_layer_norm_eps", ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")),
    ("add_expert_count", ("num_local_experts", "num_experts", "n_routed_experts")),
    ("add_expert_used_count", ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")),
)
ROPE_THETA = ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
LOCAL_ROPE_THETA = (
    "local_rope_theta",
    "rope_local_theta",
    "rope_theta_local",
    "swa_rope_theta",
    "rope_local_base_freq",
)
PARTIAL_ROTARY = ("partial_rotary_factor", "rope_pct", "rope_percent")
BLOCK_COUNT = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")
YARN_PARAMS = (
    ("add_rope_scaling_yarn_ext_factor", ("extrapolation_factor",)),
    ("add_rope_scaling_yarn_attn_factor", ("attention_factor", "attn_factor")),
    ("add_rope_scaling_yarn_beta_fast", ("beta_fast",)),
    ("add_rope_scaling_yarn_beta_slow", ("beta_slow",)),
)


def find(params: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The value of the first of ``keys`` present in ``params`` (None when none is)."""
    key = next((k for k in keys if k in params), None)
    return params[key] if key is not None else None


# Reads a config as the converter does, in a child process (gguf_header.prefetch_hparams): transformers'
# AutoConfig with torch hidden (a config needs none; importing it took 0.8 s of the 1.6 s), the result as JSON,
# refused (exit 3) where JSON would not give back the same dict.
HPARAMS_CHILD = """
import importlib.util, json, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else find_spec(name, *a, **k)
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoTorch())
from transformers import AutoConfig
params = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=False).to_dict()
labels = params.pop("id2label", None)  # its keys are ints: as pairs
sent = {"params": params, "id2label": None if labels is None else [[k, v] for k, v in labels.items()]}
text = json.dumps(sent)
sys.exit(3) if json.loads(text) != sent else sys.stdout.write(text)
"""
_PREFETCHED: dict[Path, subprocess.Popen] = {}


def prefetch_hparams(folder: Path) -> None:
    """Start reading ``folder``'s configuration for :func:`load_hparams` in a child process, so that it runs
    beside the reading of the adapters and the plan instead of before the GGUF's first tensor."""
    key = Path(folder).resolve()
    if key in _PREFETCHED or "transformers" in sys.modules:  # loaded already: in-process costs nothing
        return
    child = hparams_child(folder)
    if child is not None:
        if not _PREFETCHED:
            atexit.register(_stop_children)
        _PREFETCHED[key] = child


def _stop_children() -> None:
    """At exit: stop the children nobody read (the merge failed before its header)."""
    for child in _PREFETCHED.values():
        child.kill()
        child.wait()
    _PREFETCHED.clear()


def hparams_child(folder: Path) -> subprocess.Popen | None:
    """The child process reading ``folder``'s configuration (:data:`HPARAMS_CHILD`); None where none starts."""
    try:
        return subprocess.Popen(
            [sys.executable, "-c", HPARAMS_CHILD, str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None


def hparams_from_child(child: subprocess.Popen, folder: Path) -> dict[str, Any] | None:
    """What ``child`` read: transformers' config dict of ``folder`` (as in-process), or None where it failed."""
    out, _ = child.communicate()
    if child.returncode != 0:
        return None
    try:
        sent = json.loads(out)
    except ValueError:
        return None
    params = sent["params"]
    params["_name_or_path"] = str(folder)  # as AutoConfig names it for the path load_hparams is given
    if sent["id2label"] is not None:
        params["id2label"] = {k: v for k, v in sent["id2label"]}
    return params


def load_hparams(folder: Path) -> dict[str, Any]:
    """The model's configuration as the converter reads it: transformers' full config (defaults included), the
    text part of a multimodal one lifted to the top; the raw ``config.json`` where transformers cannot read it.
    From the child :func:`prefetch_hparams` started, when it did and succeeded."""
    child = _PREFETCHED.pop(Path(folder).resolve(), None)
    params = None if child is None else hparams_from_child(child, folder)
    if params is None:
        try:
            from transformers import AutoConfig

            params = AutoConfig.from_pretrained(folder, trust_remote_code=False).to_dict()
        except Exception as exc:  # noqa: BLE001 -- any failure falls back to the file, as the converter does
            log.debug("transformers cannot read %s (%s): using config.json", folder, exc)
            with open(folder / "config.json", encoding="utf-8") as handle:
                params = json.load(handle)
    for wrapper in ("llm_config", "lm_config", "language_config", "lfm"):
        if wrapper in params:
            params["text_config"] = params[wrapper]
    if "text_config" in params:
        params = {**params, **params["text_config"]}
    return params


def rope_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The rope settings with the top-level theta, type and factors mirrored in (the converter's view)."""
    rope = copy.deepcopy(params.get("rope_parameters", params.get("rope_scaling")) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return rope
    if (local := find(params, LOCAL_ROPE_THETA)) is not None:
        rope["sliding_attention"] = {"rope_theta": local}
    mirrored = {
        "rope_theta": find(params, ROPE_THETA),
        "rope_type": rope.get("type"),
        "partial_rotary_factor": find(params, PARTIAL_ROTARY),
        "original_max_position_embeddings": params.get("original_max_position_embeddings"),
    }
    for key, value in mirrored.items():
        if key not in rope and value is not None:
            rope[key] = value
    return rope


def _add_rope(writer: Any, gguf: Any, rope: dict[str, Any]) -> None:
    params = rope.get("full_attention", rope)
    kind, factor = params.get("rope_type"), params.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for method, keys in YARN_PARAMS:
            if (value := find(params, keys)) is not None:
                getattr(writer, method)(value)
    elif kind in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if "mrope_section" in rope:
        writer.add_rope_dimension_sections((list(rope["mrope_section"]) + [0, 0, 0, 0])[:4])
    if (theta := params.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(local)


def _add_pooling(writer: Any, gguf: Any, folder: Path) -> None:
    """A sentence-transformers folder's pooling type (modules.json), as the converter records it for qwen2/3."""
    modules = folder / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text(encoding="utf-8"))
        path = next((m["path"] for m in entries if m["type"].endswith("Pooling")), None)
        if path is not None:
            pooling = json.loads((folder / path / "config.json").read_text(encoding="utf-8"))
            modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
            flags = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
            flags["pooling_mode_lasttoken"] = "lasttoken"
            mode = next((m for flag, m in flags.items() if pooling.get(flag)), pooling.get("pooling_mode"))
            if mode not in modes:
                raise LorafuseError(f"{folder / path}: pooling {mode!r} is not one llama.cpp has (mean, cls, last)")
            writer.add_pooling_type(modes[mode])


def required(params: dict[str, Any], key: str, where: Path) -> Any:
    if key not in params:
        raise LorafuseError(f"{where / 'config.json'} has no {key}, which the GGUF of this architecture records")
    return params[key]


def _add_gemma2(writer: Any, params: dict[str, Any], folder: Path, blocks: int, file_type: Any) -> None:
    """Gemma2's own set (the converter writes no rope keys for it)."""
    for method, key in (("add_context_length", "max_position_embeddings"), ("add_embedding_length", "hidden_size")):
        getattr(writer, method)(required(params, key, folder))
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(required(params, "intermediate_size", folder))
    writer.add_head_count(required(params, "num_attention_heads", folder))
    writer.add_head_count_kv(params.get("num_key_value_heads", params["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(required(params, "rms_norm_eps", folder))
    writer.add_key_length(required(params, "head_dim", folder))
    writer.add_value_length(params["head_dim"])
    writer.add_file_type(file_type)
    writer.add_attn_logit_softcapping(required(params, "attn_logit_softcapping", folder))
    writer.add_final_logit_softcapping(required(params, "final_logit_softcapping", folder))
    writer.add_sliding_window(required(params, "sliding_window", folder))


def _add_gemma3(writer: Any, params: dict[str, Any], folder: Path) -> None:
    """Gemma3's corrections to the text model's set, with the defaults the converter assumes."""
    if params.get("attn_logit_softcapping") is not None:
        raise LorafuseError(f"{folder / 'config.json'}: Gemma3 with attn_logit_softcapping is not one llama.cpp has")
    writer.add_context_length(params.get("max_position_embeddings", 131072))
    writer.add_head_count(params.get("num_attention_heads", 8))
    writer.add_layer_norm_rms_eps(params.get("rms_norm_eps", 1e-6))
    writer.add_key_length(params.get("head_dim", 256))
    writer.add_value_length(params.get("head_dim", 256))
    rope = rope_parameters(params)
    writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if softcap := params.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(softcap)
    if params.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(required(params, "sliding_window", folder))
    writer.add_head_count_kv(params.get("num_key_value_heads", 4))


def _phi3_dims(params: dict[str, Any], folder: Path) -> tuple[dict[str, Any], int]:
    """Phi-3's rope settings and rotary dimension count, as the converter computes them."""
    rope = rope_parameters(params)
    if "original_max_position_embeddings" not in rope:
        raise LorafuseError(
            f"{folder / 'config.json'} has no original_max_position_embeddings, which Phi-3's GGUF records"
        )
    embd = find(params, ("hidden_size", "n_embd"))
    heads = find(params, ("num_attention_heads", "n_head"))
    return rope, int(rope.get("partial_rotary_factor", 1.0) * embd) // heads


def _add_phi3(writer: Any, params: dict[str, Any], folder: Path, blocks: int, file_type: Any) -> None:
    """Phi-3's own set (sliding_window 0 when the config has none, as the converter marks non-Phi-4 models)."""
    rope, rope_dims = _phi3_dims(params, folder)
    writer.add_context_length(find(params, ("n_positions", "max_position_embeddings")))
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_embedding_length(find(params, ("hidden_size", "n_embd")))
    writer.add_feed_forward_length(required(params, "intermediate_size", folder))
    writer.add_block_count(blocks)
    writer.add_head_count(find(params, ("num_attention_heads", "n_head")))
    writer.add_head_count_kv(find(params, ("num_key_value_heads", "n_head_kv")))
    writer.add_layer_norm_rms_eps(required(params, "rms_norm_eps", folder))
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_file_type(file_type)
    writer.add_sliding_window(params.get("sliding_window") or 0)


@dataclass(frozen=True)
class RopeFactors:
    """A long-context Phi-3's generated tensors (``rope_factors_long/short.weight``) and attention factor."""

    attn_factor: float
    long: np.ndarray
    short: np.ndarray


def phi3_rope_factors(params: dict[str, Any], folder: Path) -> RopeFactors | None:
    """What the converter generates for a Phi-3 with rope ``long_factor``s (none without them); one-line errors
    where the converter stops."""
    rope, rope_dims = _phi3_dims(params, folder)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return None
    where = folder / "config.json"
    scale = find(params, ("n_positions", "max_position_embeddings")) / rope["original_max_position_embeddings"]
    kind = str(rope.get("rope_type") or "").lower()
    if kind in ("su", "longrope"):
        orig = rope["original_max_position_embeddings"]
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise LorafuseError(f"{where}: Phi-3 rope scaling {kind or '(no type)'} is not one llama.cpp converts")
    if short is None or len(long) != len(short) or len(long) != rope_dims / 2:
        raise LorafuseError(f"{where}: rope long_factor and short_factor must both have {rope_dims // 2} values")
    return RopeFactors(attn_factor, np.asarray(long, dtype=np.float32), np.asarray(short, dtype=np.float32))


def llama3_rope_freqs(params: dict[str, Any]) -> np.ndarray | None:
    """The ``rope_freqs.weight`` the converter generates for llama3 rope scaling (None without it): per rotary
    pair, 1 for short wavelengths, the factor for long ones, a smooth blend between. Computed in torch float32 as
    the converter computes it (its rounding of the pow and divisions decides the bits); torch is already loaded by
    the transformers config reader."""
    rope = rope_parameters(params)
    rope = rope.get("full_attention", rope)
    if str(rope.get("rope_type") or "").lower() != "llama3":
        return None
    from .torch_bridge import require_torch

    torch = require_torch("GGUF output of llama3 rope scaling")
    base = rope.get("rope_theta", 10000.0)
    dim = params.get("head_dim")
    if dim is None:
        dim = params["hidden_size"] // params["num_attention_heads"]
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    factors: list[Any] = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / freq  # a float32 tensor, as the converter's
        if wavelen < context / high:
            factors.append(1)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def add_hparams(writer: Any, spec: GGUFArch, params: dict[str, Any], folder: Path, file_type: Any) -> None:
    """The ``<arch>.*`` hyperparameters and ``general.file_type`` (a key written twice keeps its first place and
    its last value, as in the converter)."""
    gguf = require_gguf()
    if spec.params == "gemma2":
        _add_gemma2(writer, params, folder, find(params, BLOCK_COUNT), file_type)
        return
    if spec.params == "phi3":
        _add_phi3(writer, params, folder, find(params, BLOCK_COUNT), file_type)
        return
    writer.add_block_count(find(params, BLOCK_COUNT))
    for method, keys in TEXT_PARAMS:
        if (value := find(params, keys)) is not None:
            getattr(writer, method)(value)
    if params.get("is_causal") is False:
        writer.add_causal_attention(False)
    _add_rope(writer, gguf, rope_parameters(params))
    for method, keys in NORM_PARAMS:
        if (value := find(params, keys)) is not None:
            getattr(writer, method)(value)
    if params.get("n_group") is not None or params.get("topk_group") is not None:
        raise LorafuseError("expert groups (n_group/topk_group) are not implemented for GGUF output")
    if (head_dim := params.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    if spec.llama_params:
        writer.add_vocab_size(params["vocab_size"])
        writer.add_rope_dimension_count(
            params.get("head_dim") or params["hidden_size"] // params["num_attention_heads"]
        )
    if spec.pooling:
        _add_pooling(writer, gguf, folder)
    if spec.params == "gemma3":
        _add_gemma3(writer, params, folder)


@dataclass
class GGUFTensor:
    """One tensor of the GGUF file: the checkpoint tensor it comes from, its GGUF name and type, its place in the
    file, for q/k of rope models the head count whose rows are reordered, and where its bytes are when a GGUF
    base's are copied as they are."""

    source: str
    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int
    heads: int | None
    shift: float = 0.0  # added before conversion (Gemma's norms)
    raw: tuple[int, int] | None = None  # a GGUF base's untouched tensor: (offset, nbytes) of its bytes, copied as are
    offset: int = 0  # absolute, set once the header is written
    generated: np.ndarray | None = None  # a tensor the converter makes from the config (Phi-3's rope factors)


def tensor_type(spec: GGUFArch, name: str, shape: tuple[int, ...], outtype: str) -> Any:
    """The converter's choice of type for tensor ``name`` (a weight, or a LoRA's ``.lora_a``/``.lora_b``): float32
    for 1-D tensors, norms, biases and a few others; F16 for embeddings and output with a ternary type; else the
    outtype's, falling back to F16 (with a warning) where the row length is not a multiple of its block."""
    gguf = require_gguf()
    qt = gguf.GGMLQuantizationType
    block = block_of(name)
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")):
        return qt.F32
    if any(is_tensor(spec, name, key, block) for key in F32_TENSORS):
        return qt.F32
    kind = getattr(qt, OUTTYPES[outtype][1])
    if outtype in ("tq1_0", "tq2_0") and any(is_tensor(spec, name, key, block) for key in F16_WITH_TERNARY):
        return qt.F16
    block_size = gguf.GGML_QUANT_SIZES[kind][0]
    if shape[-1] % block_size:
        log.warning("%s: a row of %d values is not a multiple of %s's %d: written as F16", name, shape[-1],
                    kind.name, block_size)  # fmt: skip
        return qt.F16
    return kind


def tensor_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    gguf = require_gguf()
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block_size * type_size


def generated_tensors(spec: GGUFArch, params: dict[str, Any], folder: Path | None) -> list[tuple[str, np.ndarray]]:
    """The tensors the converter makes from the config rather than the checkpoint (GGUF name, float32 values):
    llama3 rope scaling's ``rope_freqs.weight``, a long-context Phi-3's rope factors."""
    gguf = require_gguf()
    made: list[tuple[str, np.ndarray]] = []
    if spec.params == "phi3" and folder is not None and (factors := phi3_rope_factors(params, folder)) is not None:
        made = [("ROPE_FACTORS_LONG", factors.long), ("ROPE_FACTORS_SHORT", factors.short)]
    if spec.llama_params and (freqs := llama3_rope_freqs(params)) is not None:
        made = [("ROPE_FREQS", freqs)]
    return [(gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, key)] + ".weight", values) for key, values in made]


def plan_tensors(
    spec: GGUFArch,
    params: dict[str, Any],
    sources: list[tuple[str, tuple[int, ...]]],
    outtype: str,
    folder: Path | None = None,
) -> list[GGUFTensor]:
    """The GGUF tensors of checkpoint tensors ``sources`` (name, shape), in their order (dropped ones left out),
    after the ones the converter generates (:func:`generated_tensors`); ``folder``: the model's, for an
    architecture whose embedding keeps only its tokenizer's rows and for Phi-3's rope factors."""
    from .gguf_vocab import real_vocab_size

    blocks = find(params, BLOCK_COUNT)
    tensors = []
    for name, values in generated_tensors(spec, params, folder):  # first, as the converter yields them
        qtype = require_gguf().GGMLQuantizationType.F32
        tensors.append(GGUFTensor(name, name, qtype, values.shape, tensor_nbytes(values.shape, qtype), None,
                                  generated=values))  # fmt: skip
    for source, shape in sources:
        name = gguf_tensor_name(spec, blocks, source)
        if name is None:
            continue
        if spec.real_vocab and name == "token_embd.weight" and folder is not None:
            shape = (min(shape[0], real_vocab_size(folder, params)), *shape[1:])  # rows past it are not written
        qtype = tensor_type(spec, name, shape, outtype)
        heads = qk_heads(spec, source, params)
        shift = norm_shift(spec, source)
        tensors.append(GGUFTensor(source, name, qtype, shape, tensor_nbytes(shape, qtype), heads, shift))
    return tensors


def auto_outtype(dtypes: list[tuple[tuple[int, ...], np.dtype]]) -> str:
    """``--outtype auto``: bf16 or f16 after the first matrix's dtype, else f16 (the converter's choice)."""
    for shape, dtype in dtypes:
        if len(shape) >= 2:
            name = np.dtype(dtype).name
            return "bf16" if name == "bfloat16" else "f16"
    return "f16"


def file_type_of(outtype: str) -> Any:
    return getattr(require_gguf().LlamaFileType, OUTTYPES[outtype][0])


def build_header(
    spec: GGUFArch,
    params: dict[str, Any],
    folder: Path,
    tensors: list[GGUFTensor],
    outtype: str,
    extra: dict[str, str] | None = None,
) -> Any:
    """A ``gguf.GGUFWriter`` holding the whole header: tensor table, ``general.*`` metadata (from the model folder's
    card and config, as the converter derives it), hyperparameters, quantization version, tokenizer and ``extra``
    string keys (lorafuse's provenance)."""
    gguf = require_gguf()
    from .gguf_vocab import add_vocab

    writer = new_writer(gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.arch)])
    if spec.params == "phi3" and (factors := phi3_rope_factors(params, folder)) is not None:
        writer.add_rope_scaling_attn_factors(factors.attn_factor)  # the converter adds it as it makes the tensors
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, folder, None, total)
    if metadata.name is None:
        metadata.name = folder.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    add_hparams(writer, spec, params, folder, file_type_of(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, folder, spec, params)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    return writer


def write_header(writer: Any, path: Path, tensors: list[GGUFTensor]) -> int:
    """Write ``writer``'s header and tensor table to ``path``; sets each tensor's absolute offset and returns the
    file's full size (tensor data padded to the alignment, as llama.cpp's writer pads it)."""
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    align = writer.data_alignment
    at = -(-path.stat().st_size // align) * align
    for t in tensors:
        t.offset = at
        at += -(-t.nbytes // align) * align
    return at


def field_value(field: Any) -> tuple[Any, Any, Any]:
    """A GGUF key's (value, type, array item type) as gguf-py's writer takes them; strings as their raw bytes (a
    token need not be valid UTF-8)."""
    gguf = require_gguf()
    kinds = gguf.GGUFValueType
    kind = field.types[0]
    if kind == kinds.ARRAY:
        item = field.types[1] if len(field.types) > 1 else kinds.INT32
        if item == kinds.ARRAY:
            raise LorafuseError(f"GGUF key {field.name} holds nested arrays, which lorafuse does not copy")
        if item == kinds.STRING:
            return [bytes(field.parts[i]) for i in field.data], kind, item
        return field.contents(), kind, item
    if kind == kinds.STRING:
        return bytes(field.parts[field.data[0]]), kind, None
    return field.contents(), kind, None


def can_quantize(qtype: Any) -> bool:
    """Whether gguf-py writes ``qtype`` (it reads every type, but quantizes only some: no K-quants, no IQ)."""
    gguf = require_gguf()
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.quants.QuantError):
        return False
    return True


def base_header(
    base: Any, touched: set[str], requant: str, extra: dict[str, str], warnings: list[str]
) -> tuple[Any, list[GGUFTensor]]:
    """The header of a merge into GGUF base ``base`` (io/gguf_checkpoint.py): its keys as they are, plus ``extra``;
    its tensors in their order and types, except ``touched`` ones of a type gguf-py cannot write, which become
    ``requant`` (said in ``warnings``). Untouched tensors keep their bytes (``GGUFTensor.raw``)."""
    gguf = require_gguf()
    writer = new_writer(str(base.value("general.architecture")))
    writer.data_alignment = base.alignment
    for name, field in base.fields.items():
        if name != "general.architecture":  # the writer put it first, as the file has it
            value, kind, item = field_value(field)
            writer.add_key_value(name, value, kind, sub_type=item)
    for key, value in extra.items():
        writer.add_string(key, value)
    fallback = getattr(gguf.GGMLQuantizationType, OUTTYPES[requant][1])
    requantized = []
    tensors = []
    for source, raw in base.raws.items():
        qtype, keep = raw.qtype, source not in touched
        if not keep and not can_quantize(qtype):
            qtype = fallback
            requantized.append(f"{raw.name} ({raw.qtype.name})")
        nbytes = raw.nbytes if qtype == raw.qtype else tensor_nbytes(raw.shape, qtype)
        t = GGUFTensor(  # a merged Gemma norm gets the converter's shift back (raw.shift)
            source, raw.name, qtype, raw.shape, nbytes, raw.heads, raw.shift, (raw.offset, raw.nbytes) if keep else None
        )
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        tensors.append(t)
    if requantized:
        message = (
            f"{len(requantized)} merged tensor(s) are of a type gguf-py cannot write and were quantized to "
            f"{fallback.name} (--requant): {', '.join(requantized[:4])}{', ...' if len(requantized) > 4 else ''}"
        )
        log.warning(message)
        warnings.append(message)
    return writer, tensors
