"""The merge plan: for every output tensor, its source tensor, output dtype and ordered edits.

Built and validated before one byte is written: every edit must land on an existing base tensor (or a range of
its rows) of a compatible shape, adapter tensors must be finite, and what has no effect is reported. The kernels
(engine/) apply a plan; nothing here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import is_float, nbytes_of
from .conv1d import is_conv1d_weight
from .edits import Edit, RowReplace, TargetedEdit, TensorRef, require_finite
from .errors import AdapterError, ShapeMismatchError
from .io.checkpoint import Checkpoint
from .io.extra_files import read_json
from .names import layout_of
from .names.parts import PartTally
from .part_weights import factor as part_factor
from .peft_flags import finite_number
from .quantized import BasePreparation, Fp8Dequant, Fp8Encode, prepare_base
from .targets import EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING, unmatched_targets

log = logging.getLogger("lorafuse")
NONFINITE_NAMES_SHOWN = 3


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
    part_weights: dict[str, float] = field(default_factory=dict)  # diffusion part -> factor (part_weights.py)


@dataclass(frozen=True)
class PlacedEdit:
    """An edit on an output tensor: all of it, or rows ``rows`` = (start, stop)."""

    edit: Edit
    rows: tuple[int, int] | None = None


@dataclass
class OutputTensor:
    """One tensor of the merged model."""

    name: str
    source: str
    dtype: np.dtype
    shape: tuple[int, ...]
    edits: list[PlacedEdit] = field(default_factory=list)
    dequant: Fp8Dequant | None = None  # stored tensor -> fp32, for quantized bases (see quantized.py)
    encode: Fp8Encode | None = None  # merged fp32 -> stored fp8 values, for fp8 bases written in fp8 (quantized.py)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass
class MergePlan:
    """Everything a kernel needs, plus what validation found."""

    base: Checkpoint
    tensors: list[OutputTensor]
    warnings: list[str] = field(default_factory=list)
    config_updates: dict[str, Any] = field(default_factory=dict)
    resized_by: list[str] = field(default_factory=list)  # adapters that resize the vocabulary (their tokenizer)
    # Untouched float base tensors to check for NaN/Inf (a warning): the kernel reads them beside the merge.
    scan: list[str] = field(default_factory=list)
    idle: list[str] = field(default_factory=list)  # adapters whose every update is all zeros (they change nothing)
    parts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # adapter -> diffusion part -> counts

    @property
    def touched(self) -> list[OutputTensor]:
        return [t for t in self.tensors if t.edits]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def nonfinite_warning(found: list[str]) -> str | None:
    """The warning for base tensors no adapter touches that hold NaN or Inf (they are copied as they are)."""
    if not found:
        return None
    shown = ", ".join(found[:NONFINITE_NAMES_SHOWN]) + (", ..." if len(found) > NONFINITE_NAMES_SHOWN else "")
    return (
        f"{len(found)} base tensor(s) that no adapter changes hold NaN or Inf and are copied as they are: {shown}; "
        "the base model itself is broken there"
    )


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


def _config_beside(base: Checkpoint) -> dict[str, Any] | None:
    """The config.json beside a base passed as one weight file (a file of a model folder): it names the model's
    layer classes, which orient square LoRA updates (conv1d.py)."""
    if len(base.files) != 1:
        return None
    return read_json(base.files[0].parent / "config.json")


def _rows_error(rows: tuple[int, int], shape: tuple[int, ...]) -> str | None:
    start, stop = rows
    if not shape or not 0 <= start < stop <= shape[0]:
        return f"rows {start}:{stop} are not rows of a tensor of shape {tuple(shape)}"
    return None


def build_plan(
    base: Checkpoint,
    adapters: list[AdapterInput],
    dtype: np.dtype | None = None,
    base_config: dict[str, Any] | None = None,
    check_values: bool = True,
    allow_unmatched: bool = False,
    conv1d_modules: Collection[str] | None = None,
) -> MergePlan:
    """Map every adapter edit onto the base, validate, and lay out the output tensors in base order.

    ``conv1d_modules`` (``--conv1d-modules``, see conv1d.py) names the base's GPT-2 Conv1D modules, instead of
    its config.json, for orienting square 2-D updates.

    ``allow_unmatched``: adapter tensors whose target the base does not have (a kohya file's text-encoder LoRAs
    merged into a UNet) are skipped with a warning instead of refused. ``check_values``: read every adapter tensor
    (NaN/Inf is an error, an update of zeros a warning) and list the untouched float base tensors in ``scan``.
    """
    # the name maps of the base's layout (its shapes size the rows of fused tensors)
    matcher = layout_of({name: info.shape for name, info in base.infos.items()}, base_config)
    layer_config = base_config if base_config is not None else _config_beside(base)
    per_key: dict[str, list[PlacedEdit]] = {}
    extra: dict[str, str] = {}  # new output tensor (an untied head) -> its source base tensor
    warnings: list[str] = []
    config_updates: dict[str, Any] = {}
    deferred: set[str] = set()  # embedding/head tensors whose shape check waits for the edits' order
    tied = _tied(base_config) and OUTPUT_EMBEDDING not in base
    prep = prepare_base(base, base_config, dtype)  # refuses quantized bases it cannot dequantize, before any writing
    config_updates.update(prep.config_updates)

    token_rows: dict[str, dict[int, tuple[int, str]]] = {}  # embedding -> trainable-token row -> its adapter
    editors: dict[str, set[int]] = {}  # output tensor -> the adapters (by position) that edit it
    parts: dict[str, dict[str, dict[str, int]]] = {}
    for index, adapter in enumerate(adapters):
        # Every entry point passes through here (merge, lora-merger's --alpha, verify): one check of the strength.
        adapter.weight = finite_number(
            adapter.weight, f"the strength of {adapter.label} (--weight, --alpha)", "give a finite number such as 1.0"
        )
        skipped: list[str] = []
        tally = PartTally.of_base(adapter.label, base.keys(), (t.edit.source_key or t.target for t in adapter.edits))
        placed_edits = matcher.translate(adapter.edits)  # (the adapter's edit, it on the base layout's names)
        for original, targeted in placed_edits:
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
                if targeted.optional:
                    continue
                if allow_unmatched:
                    skipped.append(targeted.edit.source_key or targeted.target)
                    tally.missed(skipped[-1], targeted.target)
                    continue
                raise ShapeMismatchError(
                    f"{adapter.label}: {targeted.edit.source_key!r} targets {targeted.target!r}, which the base model "
                    "does not have: is this the base model the adapter was trained on? (--allow-unmatched skips "
                    "such tensors)"
                )
            tally.placed(targeted.edit.source_key or targeted.target, original.target, key)
            source = extra.get(key, key)
            shape = tuple(base.infos[source].shape)
            if targeted.rows is not None:
                err = _rows_error(targeted.rows, shape)
                if err:
                    raise _does_not_fit(adapter.label, targeted.edit, key, err)
                shape = (targeted.rows[1] - targeted.rows[0], *shape[1:])
            conv1d = is_conv1d_weight(layer_config, source, conv1d_modules)
            edit = targeted.edit.oriented(shape, conv1d).bound(base, source)
            err = edit.shape_error(shape)
            if err and targeted.rows is None and _is_vocab_tensor(key):
                deferred.add(key)  # checked below, in merge order: a resized vocabulary changes the shape
                err = None
            if err:
                raise _does_not_fit(adapter.label, edit, key, err)
            if not is_float(base.infos[source].dtype) and not prep.mergeable(source):
                raise AdapterError(
                    f"{adapter.label}: base tensor {key!r} is {base.infos[source].code} (quantized or integer); "
                    "merge into the unquantized base model instead, then quantize the merged model"
                )
            source_name = targeted.edit.source_key or targeted.target
            strength = adapter.weight * part_factor(adapter.part_weights, adapter.label, source_name)
            per_key.setdefault(key, []).append(PlacedEdit(edit.scaled(strength), targeted.rows))
            editors.setdefault(key, set()).add(index)
            if isinstance(edit, RowReplace):
                _claim_token_rows(token_rows.setdefault(key, {}), index, adapter.label, edit, key)
        warnings.extend(_unmatched_targets(adapter))
        warnings.extend(tally.check())  # a part the base holds that matched nothing is refused
        if tally.summary():
            parts[adapter.label] = tally.summary()
        if skipped:
            if len(skipped) == len(placed_edits):
                raise ShapeMismatchError(
                    f"{adapter.label}: none of its {len(skipped)} updates targets a base tensor (first: "
                    f"{skipped[0]!r}); is this the base model the adapter was trained on?"
                )
            warnings.append(
                f"{adapter.label}: {len(skipped)} updates target tensors the base does not have and were skipped "
                f"(--allow-unmatched), e.g. {skipped[0]!r}"
            )

    _check_reads(per_key, [adapter.label for adapter in adapters])
    _refuse_shared_base_changes(per_key, editors)
    # PEFT saves a copy of a LoRA-wrapped embedding's base layer with each adapter; that copy is the weight every
    # adapter's LoRA applies on, so it goes first, or a later adapter's copy would wipe an earlier one's update.
    for key, edits in per_key.items():
        per_key[key] = sorted(edits, key=lambda placed: not placed.edit.goes_first)
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

    idle: list[str] = []
    if check_values:
        warnings.extend(_check_values(adapters, idle))

    prep.bind({key for key, placed in per_key.items() if placed})
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
    scan = []
    if check_values:
        sources = {t.source for t in tensors if t.edits}
        scan = [
            name
            for name, info in base.infos.items()
            if name not in sources and name not in prep.dropped and name not in prep.dequant and is_float(info.dtype)
        ]
    resizers = _resizers(per_key, resized)
    return MergePlan(base, tensors, warnings, config_updates, resized_by=resizers, scan=scan, idle=idle, parts=parts)


def _output(
    name: str,
    source: str,
    src_dtype: np.dtype,
    shape: tuple[int, ...],
    edits: list[PlacedEdit],
    dtype: np.dtype | None,
    prep: BasePreparation | None = None,
) -> OutputTensor:
    # Whatever an edit that sets the whole tensor overwrites, never needs computing (and may have had other rows).
    last = max((i for i, p in enumerate(edits) if p.rows is None and p.edit.overwrites), default=0)
    edits = list(edits[last:])
    out_dtype = dtype if (dtype is not None and is_float(src_dtype)) else src_dtype
    fp8 = prep.fp8_output(source) if prep is not None else None
    if fp8 is not None:
        return OutputTensor(name, source, fp8[0], tuple(shape), edits, fp8[1], fp8[2])
    if prep is not None and source in prep.dequant:
        deq_dtype = prep.output_dtype(source, dtype)
        return OutputTensor(name, source, deq_dtype, tuple(shape), edits, prep.dequant[source])
    return OutputTensor(name, source, out_dtype, tuple(shape), edits)


def _is_vocab_tensor(key: str) -> bool:
    return key.endswith(EMBEDDING_SUFFIXES) or key.endswith(OUTPUT_EMBEDDING)


def _shape_after(key: str, shape: tuple[int, ...], edits: list[PlacedEdit]) -> tuple[int, ...]:
    """The shape of an embedding or head after its edits, in order.

    A tokenizer with added tokens gives the trained model more vocabulary rows than the base: PEFT then saves the
    resized embedding/head whole (``modules_to_save``, or the LoRA'd embedding's base layer), and any LoRA on it
    has the new shape. Any other mismatch is the usual wrong-base error.
    """
    current = tuple(shape)
    for placed in edits:
        new = placed.edit.new_shape(current)
        if new is not None:
            current = new
            continue
        err = placed.edit.shape_error(current)
        if err:
            raise _does_not_fit(placed.edit.adapter, placed.edit, key, err)
    return current


def _refuse_shared_base_changes(per_key: dict[str, list[PlacedEdit]], editors: dict[str, set[int]]) -> None:
    """An edit that rewrites its base weight (Edit.changes_base) must be its tensor's only adapter's."""
    for key, placed in per_key.items():
        changing = next((p.edit for p in placed if p.edit.changes_base), None)
        if changing is not None and len(editors[key]) > 1:
            others = sorted({p.edit.adapter for p in placed if p.edit.adapter != changing.adapter})
            other = others[0] if others else f"{changing.adapter} (given twice)"
            raise AdapterError(
                f"{changing.adapter}: {changing.source_key!r} rewrites base tensor {key!r} as PEFT does when it loads "
                f"the adapter (KaSA's truncation), and {other} changes it too: merge this adapter alone, then "
                "merge the other into its output"
            )


def _claim_token_rows(claimed: dict[int, tuple[int, str]], index: int, label: str, edit: RowReplace, key: str) -> None:
    """Record the rows of ``key`` that adapter number ``index`` trains as tokens; refuse rows an earlier adapter
    trains too. PEFT refuses that merge (TrainableTokensLayer: only disjoint token indices), since which adapter's
    row should win is undefined."""
    for row in edit.indices:
        owner = claimed.setdefault(row, (index, label))
        if owner[0] != index:
            raise AdapterError(
                f"{label}: its trainable token {row} of {key!r} is trained by {owner[1]} too: PEFT refuses to merge "
                "adapters whose trainable tokens overlap (which row wins is undefined); merge only one of them, or "
                "train them on disjoint trainable_token_indices"
            )


def _check_reads(per_key: dict[str, list[PlacedEdit]], order: list[str]) -> None:
    """Refuse an edit that reads another base tensor (:attr:`Edit.reads`) which an earlier adapter changes: it
    reads the tensor as stored, not as the earlier adapter left it."""
    rank = {label: i for i, label in enumerate(order)}
    for placed in per_key.values():
        for edit in (p.edit for p in placed if p.edit.reads):
            for other in edit.reads:
                mine = rank.get(edit.adapter, len(order))
                # an edit of unknown order counts as earlier: refusing is safe, reading a stale tensor is not
                earlier = [p.edit.adapter for p in per_key.get(other, []) if rank.get(p.edit.adapter, -1) < mine]
                if earlier:
                    raise AdapterError(
                        f"{edit.adapter}: {edit.source_key!r} is computed from {other!r}, which {earlier[0]} changes "
                        "before it; lorafuse reads it as the base stores it: merge this adapter first, or alone"
                    )


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


def _resizers(per_key: dict[str, list[PlacedEdit]], resized: dict[str, tuple[int, ...]]) -> list[str]:
    """Labels of the adapters whose replacements set the new vocabulary (their tokenizer goes with it)."""
    labels = [p.edit.adapter for key in resized for p in per_key[key] if p.edit.overwrites]
    return list(dict.fromkeys(labels))


def _unmatched_targets(adapter: AdapterInput) -> list[str]:
    return unmatched_targets(adapter.label, adapter.target_modules, list(adapter.modules))


def _check_values(adapters: list[AdapterInput], idle_adapters: list[str]) -> list[str]:
    """NaN/Inf in an adapter tensor is an error; updates that change nothing (lora_B all zeros) are a warning, and
    the labels of adapters whose every update is one go into ``idle_adapters``."""
    warnings: list[str] = []
    for adapter in adapters:
        idle: list[str] = []
        for targeted in adapter.edits:
            edit = targeted.edit
            # Each tensor read once: checked here, and judged for no effect from the same values.
            loaded: dict[TensorRef, np.ndarray] = {ref: require_finite(ref, ref.load()) for ref in edit.refs()}
            if edit.no_effect(loaded.__getitem__):
                idle.append(edit.source_key or targeted.target)
        if idle and len(idle) == len(adapter.edits):
            idle_adapters.append(adapter.label)
            warnings.append(f"{adapter.label}: every update is all zeros (lora_B), so the adapter changes nothing")
        elif idle:
            warnings.append(
                f"{adapter.label}: {len(idle)} of {len(adapter.edits)} updates are all zeros and have no effect "
                f"(e.g. {idle[0]!r})"
            )
    return warnings
