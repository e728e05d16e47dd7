"""The merge plan: for every output tensor, its source tensor, output dtype and ordered edits.

Built and validated before one byte is written: every edit must land on an existing base tensor of a
compatible shape, adapter tensors must be finite, and what has no effect is reported.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .conv1d import is_conv1d_weight
from .cpus import usable_cpus
from .dtypes import is_float
from .edits import DoraDelta, Edit, LoraDelta, Replace, TargetedEdit, require_finite, with_strength
from .errors import AdapterError, ShapeMismatchError
from .io.byte_view import byte_view
from .io.checkpoint import Checkpoint
from .io.safetensors_file import pread_into
from .keymatch import KeyMatcher
from .peft_flags import finite_number
from .quantized import BasePreparation, prepare_base
from .targets import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING, unmatched_targets

log = logging.getLogger("lorafuse")


@dataclass
class AdapterInput:
    """One adapter, read by its format into targeted edits."""

    label: str
    edits: list[TargetedEdit]
    weight: float = 1.0
    target_modules: Any = None  # from the adapter's config, to report targets that matched nothing
    modules: dict[str, int] = field(default_factory=dict)  # LoRA module -> rank
    keep_tied: bool = False  # PEFT ensure_weight_tying: the tied embedding and head move together
    files: list[Path] = field(default_factory=list)  # weight files, for provenance hashes
    fmt: str = "peft"


@dataclass
class OutputTensor:
    """One tensor of the merged model."""

    name: str
    source: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    edits: list[Edit] = field(default_factory=list)
    dequant: Any = None  # (checkpoint, stored tensor) -> fp32 tensor, for quantized bases (see quantized.py)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class MergePlan:
    """Everything the engine needs, plus what validation found."""

    base: Checkpoint
    tensors: list[OutputTensor]
    warnings: list[str] = field(default_factory=list)
    config_updates: dict[str, Any] = field(default_factory=dict)
    resized_by: list[str] = field(default_factory=list)  # adapters that resize the vocabulary (their tokenizer)

    @property
    def touched(self) -> list[OutputTensor]:
        return [t for t in self.tensors if t.edits]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _tied(base_config: dict[str, Any] | None) -> bool:
    if not base_config:
        return False
    # transformers ties by default when config.json does not say otherwise.
    configs = [base_config] + [v for v in base_config.values() if isinstance(v, dict) and "model_type" in v]
    return any(c.get("tie_word_embeddings", True) is True for c in configs)


# Encoder families whose LM heads are named otherwise (cls.predictions.decoder, lm_head.decoder), even in their
# *ForCausalLM / *LMHeadModel classes.
ENCODER_ARCH_PREFIXES = ("Bert", "Roberta", "XLMRoberta", "Camembert", "Electra", "Ernie", "Data2Vec", "Xmod", "RoC")


def _head_is_lm_head(base_config: dict[str, Any] | None) -> bool:
    """Whether the model's tied output head is the ``lm_head.weight`` tensor (decoder LMs and seq2seq models)."""
    configs = [base_config or {}] + [v for v in (base_config or {}).values() if isinstance(v, dict)]
    archs = [a for c in configs for a in (c.get("architectures") or []) if isinstance(a, str)]
    heads = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    return any(a.endswith(heads) and not a.startswith(ENCODER_ARCH_PREFIXES) for a in archs)


def _embedding_key(base: Checkpoint, shape: tuple[int, ...] | None = None) -> str | None:
    found = [
        k for k in base.keys() if k.endswith(EMBEDDING_SUFFIXES) and (shape is None or base.infos[k].shape == shape)
    ]
    return found[0] if len(found) == 1 else None


def _flipped(edit: LoraDelta) -> LoraDelta:
    """The same LoRA read in the other orientation (Linear <-> GPT-2 Conv1D)."""
    other = replace(edit, layout="transposed" if edit.layout == "linear" else "linear")
    if isinstance(other, DoraDelta):
        other.output_dim = 1 - other.output_dim
    return other


def _fix_layout(edit: Edit, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
    """Orient a LoRA as PEFT does: by the layer's class, whatever the adapter config's ``fan_in_fan_out`` says.

    ``conv1d`` (conv1d.py) says whether the base weight is a GPT-2 Conv1D layer's, or None when the base's config
    cannot tell: then only a shape that fits the other orientation alone (not a square one) flips it.
    """
    if not isinstance(edit, LoraDelta) or edit.layout not in ("linear", "transposed"):
        return edit
    if "lora_embedding" in edit.source_key:  # embeddings are always transposed
        return edit
    if conv1d is not None:
        wanted = "transposed" if conv1d else "linear"
        other = _flipped(edit) if edit.layout != wanted else edit
        return other if other.shape_error(shape) is None else edit
    if edit.shape_error(shape):
        other = _flipped(edit)
        if other.shape_error(shape) is None and len(set(shape)) == len(shape):
            return other
    return edit


def build_plan(
    base: Checkpoint,
    adapters: list[AdapterInput],
    dtype: torch.dtype | None = None,
    base_config: dict[str, Any] | None = None,
    check_values: bool = True,
    allow_unmatched: bool = False,
) -> MergePlan:
    """Map every adapter edit onto the base, validate, and lay out the output tensors in base order.

    ``allow_unmatched``: adapter tensors whose target the base does not have (a kohya file's text-encoder LoRAs
    merged into a UNet) are skipped with a warning instead of refused.
    """
    matcher = KeyMatcher(base.keys())
    per_key: dict[str, list[Edit]] = {}
    extra: dict[str, str] = {}  # new output tensor (an untied head) -> its source base tensor
    warnings: list[str] = []
    config_updates: dict[str, Any] = {}
    deferred: set[str] = set()  # embedding/head tensors whose shape check waits for the edits' order
    tied = _tied(base_config) and OUTPUT_EMBEDDING not in base
    prep = prepare_base(base, base_config)  # refuses quantized bases it cannot dequantize, before any writing
    config_updates.update(prep.config_updates)

    for adapter in adapters:
        # Every entry point passes through here (merge, lora-merger's --alpha, verify): one check of the strength.
        adapter.weight = finite_number(
            adapter.weight, f"the strength of {adapter.label} (--weight, --alpha)", "give a finite number such as 1.0"
        )
        skipped: list[str] = []
        for targeted in adapter.edits:
            key = matcher.resolve(targeted.target)
            if key is None and tied and targeted.target.endswith(OUTPUT_EMBEDDING):
                emb = _embedding_key(base)
                if emb is not None:
                    key = OUTPUT_EMBEDDING
                    extra[key] = emb
            if key is None:
                candidates = matcher.ambiguous(targeted.target)
                if candidates:
                    raise AdapterError(
                        f"{adapter.label}: {targeted.edit.source_key!r} matches several base tensors "
                        f"({', '.join(candidates[:3])}); pass the base model the adapter was trained on"
                    )
                if allow_unmatched:
                    skipped.append(targeted.edit.source_key or targeted.target)
                    continue
                raise ShapeMismatchError(
                    f"{adapter.label}: {targeted.edit.source_key!r} targets {targeted.target!r}, which the base model "
                    "does not have: is this the base model the adapter was trained on? (--allow-unmatched skips "
                    "such tensors)"
                )
            source = extra.get(key, key)
            shape = base.infos[source].shape
            edit = _fix_layout(targeted.edit, shape, is_conv1d_weight(base_config, source))
            err = edit.shape_error(shape)
            if err and _is_vocab_tensor(key):
                deferred.add(key)  # checked below, in merge order: a resized vocabulary changes the shape
                err = None
            if err:
                raise _does_not_fit(adapter.label, edit, key, err)
            if not is_float(base.infos[source].dtype) and source not in prep.dequant:
                raise AdapterError(
                    f"{adapter.label}: base tensor {key!r} is {base.infos[source].dtype} (quantized or integer); "
                    "merge into the unquantized base model instead, then quantize the merged model"
                )
            per_key.setdefault(key, []).append(with_strength(edit, adapter.weight))
        warnings.extend(_unmatched_targets(adapter))
        if skipped:
            if len(skipped) == len(adapter.edits):
                raise ShapeMismatchError(
                    f"{adapter.label}: none of its {len(skipped)} updates targets a base tensor (first: "
                    f"{skipped[0]!r}); is this the base model the adapter was trained on?"
                )
            warnings.append(
                f"{adapter.label}: {len(skipped)} updates target tensors the base does not have and were skipped "
                f"(--allow-unmatched), e.g. {skipped[0]!r}"
            )

    # PEFT saves a copy of a LoRA-wrapped embedding's base layer with each adapter; that copy is the weight every
    # adapter's LoRA applies on, so it goes first, or a later adapter's copy would wipe an earlier one's update.
    for key, edits in per_key.items():
        per_key[key] = sorted(edits, key=lambda e: not (isinstance(e, Replace) and ".base_layer." in e.source_key))
    resized: dict[str, tuple[int, ...]] = {}  # embedding/head -> its new shape (a resized vocabulary)
    for key in deferred:
        before = tuple(base.infos[extra.get(key, key)].shape)
        after = _shape_after(key, before, per_key[key])
        if after != before:
            resized[key] = after
    if resized:
        config_updates["vocab_size"] = vocab = _resized_vocab(resized)
        warnings.append(
            f"the adapters resize the vocabulary to {vocab} tokens ({', '.join(sorted(resized))} replaced whole); "
            "config.json's vocab_size is updated"
        )

    # A tied model whose embedding or head changed must be untied to stay the model that was trained: PEFT's
    # merge would silently move both, and a loader that ties would drop one side's update. Both sides changed by
    # separate LoRAs still differ; only ensure_weight_tying (one shared update) keeps them tied.
    if tied and not any(a.keep_tied for a in adapters):
        emb = _embedding_key(base)
        if emb is not None and OUTPUT_EMBEDDING not in per_key and emb in per_key and not _head_is_lm_head(base_config):
            # The head has another name (BERT's cls.predictions.decoder) or there is none: writing lm_head.weight
            # and untying would leave that head randomly initialized. Stay tied, as PEFT's merge does.
            warnings.append(
                f"the adapters change {emb}, which config.json ties to the output head; lorafuse does not know the "
                "head's tensor name for this architecture, so the head moves with it (as in PEFT's merge)"
            )
        elif emb is not None and (emb in per_key or OUTPUT_EMBEDDING in per_key):
            extra.setdefault(OUTPUT_EMBEDDING, emb)
            config_updates["tie_word_embeddings"] = False
            warnings.append(
                f"the adapters change the tied {emb} / {OUTPUT_EMBEDDING} differently: writing both and setting "
                "tie_word_embeddings=false so the merged model computes what was trained"
            )

    if check_values:
        warnings.extend(_check_values(adapters))
        warnings.extend(_nonfinite_base(base, set(per_key) | set(extra.values()), prep))

    tensors: list[OutputTensor] = []
    for name, info in base.infos.items():
        if name in prep.dropped:
            continue
        shape = resized.get(name, info.shape)
        tensors.append(_output(name, name, info.dtype, shape, per_key.get(name, []), dtype, prep))
        for new, source in extra.items():
            if source == name:
                shape = resized.get(new, info.shape)
                tensors.append(_output(new, source, info.dtype, shape, per_key.get(new, []), dtype, prep))
    _check_vocab_agrees(tensors, resized)
    return MergePlan(base, tensors, warnings, config_updates, resized_by=_resizers(per_key, resized))


def _output(
    name: str,
    source: str,
    src_dtype: torch.dtype,
    shape: tuple[int, ...],
    edits: list[Edit],
    dtype: torch.dtype | None,
    prep: BasePreparation | None = None,
) -> OutputTensor:
    out_dtype = dtype if (dtype is not None and is_float(src_dtype)) else src_dtype
    if prep is not None and source in prep.dequant:
        deq_dtype = prep.output_dtype(source, dtype)
        return OutputTensor(name, source, deq_dtype, tuple(shape), list(edits), prep.dequant[source])
    return OutputTensor(name, source, out_dtype, tuple(shape), list(edits))


def _is_vocab_tensor(key: str) -> bool:
    return key.endswith(EMBEDDING_SUFFIXES) or key.endswith(OUTPUT_EMBEDDING)


def _shape_after(key: str, shape: tuple[int, ...], edits: list[Edit]) -> tuple[int, ...]:
    """The shape of an embedding or head after its edits, in order.

    A tokenizer with added tokens gives the trained model more vocabulary rows than the base: PEFT then saves the
    resized embedding/head whole (``modules_to_save``, or the LoRA'd embedding's base layer), and any LoRA on it
    has the new shape. Any other mismatch is the usual wrong-base error.
    """
    current = tuple(shape)
    for edit in edits:
        if isinstance(edit, Replace) and edit.weight == 1.0 and len(edit.T.shape) == 2 == len(current):
            if edit.T.shape[1] == current[1]:
                current = tuple(edit.T.shape)
                continue
        err = edit.shape_error(current)
        if err:
            raise _does_not_fit(edit.adapter, edit, key, err)
    return current


def _does_not_fit(label: str, edit: Edit, key: str, err: str) -> ShapeMismatchError:
    return ShapeMismatchError(
        f"{label}: {edit.source_key!r} does not fit base tensor {key!r}: {err}; "
        "is this the base model the adapter was trained on?"
    )


def _resized_vocab(resized: dict[str, tuple[int, ...]]) -> int:
    rows = {shape[0] for shape in resized.values()}
    if len(rows) > 1:
        raise ShapeMismatchError(
            "the adapters resize the vocabulary inconsistently ("
            + ", ".join(f"{k}: {v[0]} rows" for k, v in sorted(resized.items()))
            + "); merge the adapter trained with the final tokenizer alone"
        )
    return rows.pop()


def _check_vocab_agrees(tensors: list[OutputTensor], resized: dict[str, tuple[int, ...]]) -> None:
    """Every embedding and head of a resized model has the new vocabulary (a tied head untied from the old one
    would not)."""
    if not resized:
        return
    rows = next(iter(resized.values()))[0]
    for out in tensors:
        if _is_vocab_tensor(out.name) and len(out.shape) == 2 and out.shape[0] != rows:
            raise ShapeMismatchError(
                f"the adapters resize the vocabulary to {rows} tokens but leave {out.name!r} with {out.shape[0]} "
                "rows; the adapter must hold the resized embedding and head whole (PEFT modules_to_save)"
            )


def _resizers(per_key: dict[str, list[Edit]], resized: dict[str, tuple[int, ...]]) -> list[str]:
    """Labels of the adapters whose replacements set the new vocabulary (their tokenizer goes with it)."""
    labels = [e.adapter for key in resized for e in per_key[key] if isinstance(e, Replace)]
    return list(dict.fromkeys(labels))


def _unmatched_targets(adapter: AdapterInput) -> list[str]:
    return unmatched_targets(adapter.label, adapter.target_modules, list(adapter.modules))


def _check_values(adapters: list[AdapterInput]) -> list[str]:
    """NaN/Inf is an error; lora_B all zeros (no effect) is a warning."""
    warnings: list[str] = []
    for adapter in adapters:
        zero_modules = 0
        lora_count = 0
        for targeted in adapter.edits:
            edit = targeted.edit
            plain_lora = isinstance(edit, LoraDelta) and not isinstance(edit, DoraDelta)
            for ref in edit.refs():
                tensor = require_finite(ref, ref.load())
                # Judge lora_B from the tensor already read, rather than reading it a second time.
                if plain_lora and ref is edit.B and not tensor.any():
                    zero_modules += 1
            lora_count += plain_lora
        if lora_count and zero_modules == lora_count:
            warnings.append(f"{adapter.label}: every lora_B is all zeros, so the adapter changes nothing")
        elif zero_modules:
            warnings.append(
                f"{adapter.label}: {zero_modules} of {lora_count} modules have lora_B all zeros (no effect)"
            )
    return warnings


# Float bit patterns as integers: with the sign bit masked off, a value is NaN or Inf when its integer is at least
# the all-ones exponent. One in-place AND and one max per chunk (about 7 GB/s per core on cached pages), where
# torch.isfinite would allocate a bool tensor per chunk.
_NONFINITE_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
SCAN_CHUNK = 1 << 20  # bytes per read: stays in the CPU cache between the read, the AND and the max
NONFINITE_NAMES_SHOWN = 3
SCAN_THREADS = 4


def _holds_nonfinite(base: Checkpoint, name: str) -> bool:
    """Whether base tensor ``name`` holds NaN or Inf, read in chunks (safetensors) or whole (pickles)."""
    info = base.infos[name]
    if info.offset < 0:  # a pickled checkpoint: loaded anyway
        tensor = base.get(name)
        return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    buffer = getattr(_scan_local, "buffer", None)
    if buffer is None:
        buffer = _scan_local.buffer = torch.empty(SCAN_CHUNK, dtype=torch.uint8)
    int_dtype, mask, limit = _NONFINITE_BITS[info.dtype]
    fd = base.fd(info.path)
    for start in range(0, info.nbytes, SCAN_CHUNK):
        size = min(SCAN_CHUNK, info.nbytes - start)
        chunk = buffer[:size]
        pread_into(fd, byte_view(chunk), info.offset + start, info.path)
        bits = chunk.view(int_dtype).bitwise_and_(mask)
        if bits.max().item() >= limit:
            return True
    return False


_scan_local = threading.local()  # one chunk buffer per scanning thread


def _nonfinite_base(base: Checkpoint, touched: set[str], prep: BasePreparation) -> list[str]:
    """A warning naming the base tensors no adapter touches that hold NaN or Inf (they are copied as they are;
    touched ones fail the merged-value check instead).

    This reads every untouched float tensor once, which the merge itself never does (the engine copies them with
    the kernel), on every core up to 4 (torch ops and preadv release the GIL): about 0.1-0.2 s per GiB of cached
    pages, overlapping the CLI's background prefill copy of the same pages.
    """
    names = [
        name
        for name, info in base.infos.items()
        if name not in touched
        and name not in prep.dropped
        and name not in prep.dequant
        and (info.dtype in _NONFINITE_BITS or info.offset < 0)
        and info.nbytes
    ]
    threads = max(1, min(SCAN_THREADS, usable_cpus(), len(names)))
    if threads > 1 and all(base.infos[n].offset >= 0 for n in names):
        for path in {base.infos[n].path for n in names}:
            base.fd(path)  # opened here: Checkpoint.fd is not meant to race
        with ThreadPoolExecutor(threads, "lorafuse-scan") as pool:
            verdicts = list(pool.map(lambda n: _holds_nonfinite(base, n), names))
    else:
        verdicts = [_holds_nonfinite(base, n) for n in names]
    found = [name for name, bad in zip(names, verdicts) if bad]
    if not found:
        return []
    shown = ", ".join(found[:NONFINITE_NAMES_SHOWN]) + (", ..." if len(found) > NONFINITE_NAMES_SHOWN else "")
    return [
        f"{len(found)} base tensor(s) that no adapter changes hold NaN or Inf and are copied as they are: {shown}; "
        "the base model itself is broken there"
    ]
