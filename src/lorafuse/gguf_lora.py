"""A PEFT LoRA adapter as a GGUF LoRA (``llama-cli --lora``, ``llama-export-lora``), written as llama.cpp's
``convert_lora_to_gguf.py`` writes it: ``<gguf name>.lora_a`` / ``.lora_b`` pairs under the base architecture's
tensor names, q/k ``lora_b`` rows reordered as the base's q/k rows are, ``adapter.lora.alpha``, no tokenizer.

llama.cpp scales each pair by ``alpha / rank`` (the rank read from the tensor): an adapter whose PEFT scaling is
another (rsLoRA, alpha_pattern) or that is not a plain LoRA (DoRA, biases, saved modules, trainable tokens) would
load and compute something else, so it is refused with the fix: merge it instead (``--format gguf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, LorafuseError
from .gguf_header import load_hparams, tensor_type
from .gguf_pack import new_writer
from .gguf_quant import quantize
from .io.checkpoint import Checkpoint
from .io.output import AtomicOutput, check_output
from .names.gguf import gguf_arch_of, gguf_tensor_name, norm_shift, qk_heads, qk_row_order, require_gguf
from .peft_flags import load_config

LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's (its default: f32)
MERGE_INSTEAD = "merge it instead: lorafuse merge BASE ADAPTER -o merged.gguf --format gguf"
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConversion:
    """What ``lorafuse convert`` wrote."""

    output: str
    architecture: str
    outtype: str
    alpha: float
    tensors: int


def _adapter_file(adapter: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            return adapter / name
    raise InputError(f"{adapter} holds no adapter_model.safetensors or adapter_model.bin: not a PEFT adapter folder")


def _check_plain_lora(config: Any, where: Path) -> None:
    """llama.cpp computes ``alpha / rank`` per pair; refuse what that would get wrong."""
    refusals = {
        "it is not a LoRA (peft_type " + config.peft_type + ")": config.peft_type != "LORA",
        "it is a DoRA (llama.cpp has no magnitude vectors)": config.use_dora,
        "it uses rsLoRA (llama.cpp scales by alpha/rank, not alpha/sqrt(rank))": config.use_rslora,
        "its alpha_pattern gives modules another alpha (a GGUF LoRA has one)": bool(config.alpha_pattern),
        "it trains biases": config.bias != "none" or config.lora_bias,
        "it saves whole modules (modules_to_save)": bool(config.modules_to_save),
        "it trains token rows (trainable_token_indices)": config.trainable_token_indices is not None,
        "it was trained on Conv1D layers (fan_in_fan_out)": config.fan_in_fan_out,
    }
    for reason, refused in refusals.items():
        if refused:
            raise LorafuseError(f"{where} cannot become a GGUF LoRA: {reason}; {MERGE_INSTEAD}")


def _pairs(checkpoint: Checkpoint, where: Path, vocab: int | None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Base tensor name -> {"A": key, "B": key}, in the converter's order (sorted keys, first appearance), and
    the 1-D norm tensors some extractors add. A saved base embedding is left out, as the converter does, once its
    row count shows it is the base's (``vocab``)."""
    pairs: dict[str, dict[str, str]] = {}
    norms = []
    for key in sorted(checkpoint.keys()):
        part = next(((suffix, p) for suffix, p in PARTS.items() if suffix in key), None)
        base = key.replace(PEFT_PREFIX, "")
        if part is None:
            if key.endswith(".base_layer.weight"):  # the frozen base embedding PEFT saves beside a LoRA on it
                if vocab is not None and checkpoint.infos[key].shape[0] != vocab:
                    raise LorafuseError(
                        f"{where}: {key} has {checkpoint.infos[key].shape[0]} rows, the base's vocab_size is {vocab}:"
                        f" the adapter resized the vocabulary; {MERGE_INSTEAD}"
                    )
                continue
            if "_layernorm" in key or ".norm" in key:
                norms.append(key)
                continue
            raise LorafuseError(f"{where}: tensor {key} is not a lora_A/lora_B weight; {MERGE_INSTEAD}")
        base = base.replace(part[0], ".weight")
        pairs.setdefault(base, {})[part[1]] = key
    for base, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise LorafuseError(f"{where}: {base} has lora_{'B' if 'A' in parts else 'A'} missing")
    return pairs, norms


def convert_lora(
    adapter: str | Path, base: str | Path, output: str | Path, outtype: str = "f32", overwrite: bool = False
) -> LoraConversion:
    """Write PEFT LoRA ``adapter`` (a folder) as the GGUF LoRA file ``output``; ``base``: the base model's folder
    (its config.json names the architecture; no weights are read)."""
    gguf = require_gguf()
    adapter, base, output = Path(adapter), Path(base), Path(output)
    if outtype not in LORA_OUTTYPES:
        raise LorafuseError(f"unknown --outtype {outtype!r} for a GGUF LoRA: use {', '.join(LORA_OUTTYPES)}")
    if output.suffix != ".gguf":
        raise LorafuseError(f"a GGUF LoRA is one file: give -o a path ending in .gguf, not {output}")
    if not (base / "config.json").is_file():
        raise InputError(f"{base} has no config.json: --base must be the base model's folder")
    params = load_hparams(base)
    spec = gguf_arch_of(params, str(base / "config.json"))
    config = load_config(adapter / "adapter_config.json")
    _check_plain_lora(config, adapter)
    checked = check_output(output, overwrite, [adapter, base])
    blocks = params.get("num_hidden_layers", params.get("n_layers"))
    writer = new_writer(gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.arch)])
    with Checkpoint([_adapter_file(adapter)]) as checkpoint:
        pairs, norms = _pairs(checkpoint, adapter, params.get("vocab_size"))
        for key in norms:  # whole norm weights, as an extractor saved them: shifted as the base's are
            source = key.replace(PEFT_PREFIX, "")
            name = gguf_tensor_name(spec, blocks, source)
            if name is not None:
                values = checkpoint.array(key).astype(np.float32) + np.float32(norm_shift(spec, source))
                _add(writer, spec, name, values, outtype)
        for source, parts in pairs.items():
            name = gguf_tensor_name(spec, blocks, source)
            if name is None:  # llama.cpp's converter would drop it silently, and the LoRA with it
                raise LorafuseError(
                    f"{adapter}: llama.cpp's {spec.arch.lower()} has no tensor for {source} (the head is the "
                    f"embedding there); {MERGE_INSTEAD}"
                )
            a = checkpoint.array(parts["A"]).astype(np.float32)
            b = checkpoint.array(parts["B"]).astype(np.float32)
            heads = qk_heads(spec, source, params)
            if heads is not None:  # the base's q/k rows are reordered in the GGUF: the update's rows are too
                b = b[qk_row_order(b.shape[0], heads)]
            if name == "token_embd.weight":  # llama.cpp reads an embedding's lora_a by token (rows)
                a = a.T
            _add(writer, spec, name + ".lora_a", np.ascontiguousarray(a), outtype)
            _add(writer, spec, name + ".lora_b", np.ascontiguousarray(b), outtype)
    total = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, adapter, None, total[0])
    if metadata.name is None:
        metadata.name = base.name
    if metadata.size_label is None and total[0] > 0:
        metadata.size_label = gguf.size_label(*total)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha))
    _add_invocation_tokens(writer, gguf, config.raw, adapter)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    count = sum(len(t) for t in writer.tensors)
    with AtomicOutput(output, is_dir=False, checked=checked) as out:
        writer.write_header_to_file(path=out.tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        out.commit()
    return LoraConversion(str(output), spec.arch.lower(), outtype, float(config.lora_alpha), count)


def _add(writer: Any, spec: Any, name: str, data: np.ndarray, outtype: str) -> None:
    qtype = tensor_type(spec, name, data.shape, outtype)
    writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)  # gguf-py's bytes (gguf_quant.py)


def _add_invocation_tokens(writer: Any, gguf: Any, raw: dict[str, Any], adapter: Path) -> None:
    """An activated LoRA's invocation tokens (``alora_invocation_tokens``), as llama.cpp records them."""
    tokens = raw.get("alora_invocation_tokens")
    if raw.get("invocation_string") and not tokens:
        raise LorafuseError(
            f"{adapter}: the aLoRA's invocation_string must be tokenized: give alora_invocation_tokens in "
            "adapter_config.json"
        )
    if tokens:
        if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise LorafuseError(f"{adapter}: alora_invocation_tokens must be a list of token ids")
        writer.add_key_value(
            gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
        )
