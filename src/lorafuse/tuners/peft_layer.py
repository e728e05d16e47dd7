"""Merging one module through PEFT's own layer, for tuner types lorafuse has no numpy module for.

For one module at a time: the base layer is built (torch ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``,
``nn.Conv1d/2d/3d``) with the base's fp32 weight (and bias) at the module's own dotted path in an otherwise empty
model, PEFT wraps it with the adapter's own config, that module's saved tensors (and the tuner's model-level ones)
are loaded with PEFT's loader, and PEFT's ``merge_and_unload()`` gives the merged weight. Only that one module is
in memory. torch and peft are imported only here, when such a merge runs: without them a one-line error names the
``lorafuse[peft]`` extra and the tuner.

The layer's type is established, never guessed: a 2-D weight is an embedding's when its name is one
(targets.EMBEDDING_SUFFIXES), a GPT-2 ``Conv1D``'s when the base's config.json says so (conv1d.py), else a
``Linear``'s only when config.json says it is no ``Conv1D``; without that evidence the merge is refused.
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np

from ..arrays import F32, decode_f32
from ..conv1d import ORIENTATION_FIX
from ..edits import Array, BlockOps, Edit, TargetedEdit, TensorRef
from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..targets import EMBEDDING_SUFFIXES
from ..torch_bridge import MissingExtraError
from .registry import TunerInput, tuner_of

PEFT_EXTRA = "lorafuse[peft]"
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"
# The layer kinds of the docs' table (docs/tuners.md): what a tuner module lists in ``Tuner.extra["layers"]``.
LAYER_KINDS = ("linear", "conv1d", "conv2d", "conv3d", "embedding", "gpt2_conv1d", "parameter", "any")
CONV_KINDS = {3: "conv1d", 4: "conv2d", 5: "conv3d"}
# What PEFT raises for an adapter its layer cannot take (shapes, config values) or a tuner it cannot merge.
PEFT_ERRORS = (ValueError, TypeError, RuntimeError, KeyError, IndexError, NotImplementedError, AttributeError)


def require_peft(peft_type: str) -> tuple[ModuleType, ModuleType]:
    """``(torch, peft)``, or a one-line error saying that merging ``peft_type`` needs the ``peft`` extra."""
    try:
        import peft
        import torch
    except ImportError:
        raise MissingExtraError(
            f"merging a {peft_type} adapter runs PEFT's own layer merge, which needs torch and peft: "
            f"pip install '{PEFT_EXTRA}'"
        ) from None
    return torch, peft


def layer_kind(
    module: str, weight_shape: tuple[int, ...], conv1d: bool | None, layers: tuple[str, ...], embedding: bool = False
) -> str | None:
    """The torch layer a base weight belongs to, or None when the evidence does not establish it.

    ``layers``: the kinds the tuner's PEFT layer takes. A 2-D weight is an embedding's when the adapter saved
    embedding tensors for it (``embedding``: HiRA's ``hira_embedding_A``) or its name is one. PEFT wrapped the
    module, so a 2-D weight of a tuner that takes only one of Linear and Conv1D is that one; for one that takes
    both, the base's Conv1D evidence decides.
    """
    if len(weight_shape) in CONV_KINDS:
        return CONV_KINDS[len(weight_shape)]
    if len(weight_shape) != 2:
        return None
    if "embedding" in layers and (embedding or f"{module}.weight".endswith(EMBEDDING_SUFFIXES)):
        return "embedding"
    if conv1d is not None:
        kind = "gpt2_conv1d" if conv1d else "linear"
        return kind if kind in layers else None
    dense = [kind for kind in ("linear", "gpt2_conv1d") if kind in layers]
    return dense[0] if len(dense) == 1 else None


def _build_layer(torch: ModuleType, kind: str, weight: np.ndarray, bias: np.ndarray | None) -> Any:
    """The base layer of ``kind`` holding ``weight`` and ``bias`` (fp32; built on the meta device, then filled, so
    no random initialization runs)."""
    nn = torch.nn
    shape = weight.shape
    with torch.device("meta"):
        if kind == "linear":
            layer = nn.Linear(shape[1], shape[0], bias=bias is not None)
        elif kind == "embedding":
            layer = nn.Embedding(shape[0], shape[1])
        elif kind == "gpt2_conv1d":
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(shape[1], shape[0])  # weight (in, out)
        else:
            conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
            layer = conv(shape[1], shape[0], kernel_size=tuple(shape[2:]), bias=bias is not None)
    layer.weight = nn.Parameter(torch.from_numpy(np.array(weight, dtype=F32)), requires_grad=False)
    if kind == "gpt2_conv1d" and bias is None:
        bias = np.zeros(shape[1], dtype=F32)  # Conv1D always has one; it is not written back
    if hasattr(layer, "bias"):
        layer.bias = None if bias is None else nn.Parameter(torch.from_numpy(np.array(bias, F32)), requires_grad=False)
    return layer


def _mini_model(torch: ModuleType, module: str, layer: Any) -> Any:
    """An otherwise empty model holding ``layer`` at the dotted path ``module``: the adapter config's target
    patterns (names, regular expressions, ``layers_to_transform``) see the same name as in the trained model."""
    root = torch.nn.Module()
    parent = root
    *parents, leaf = module.split(".")
    for part in parents:
        child = torch.nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, layer)
    return root


@dataclass(frozen=True)
class PeftModule:
    """One module of a PEFT adapter, as PEFT's own layer merge needs it.

    ``keys``: the module's saved tensors; ``shared``: the tuner's model-level ones (VBLoRA's vector bank,
    RandLoRA's projections); ``config_json``: the adapter's ``adapter_config.json`` object, as JSON (hashable);
    ``params``: the tuner's parameter names (a saved one PEFT's layer does not take is an error); ``layers``: the
    layer kinds its PEFT layer takes (:data:`LAYER_KINDS`); ``embedding``: the module's saved names are an
    embedding layer's (HiRA's ``hira_embedding_A``).
    """

    peft_type: str
    module: str
    checkpoint: Checkpoint
    keys: tuple[str, ...]
    shared: tuple[str, ...]
    config_json: str
    source: str
    params: tuple[str, ...]
    layers: tuple[str, ...]
    embedding: bool = False

    def merged(self, kind: str, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """PEFT's merged (weight, bias) of this module on a base layer of ``kind`` holding ``weight``, ``bias``."""
        torch, peft = require_peft(self.peft_type)
        try:
            # PEFT's advice about the one-module model (fan_in_fan_out set per layer, ...) is noise to a user
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._merged(torch, peft, kind, weight, bias)
        except ImportError as exc:  # a tuner's own dependency (AdaMSS needs scikit-learn)
            raise MissingExtraError(f"{self.source}: merging {self.peft_type} through PEFT needs: {exc}") from None
        except PEFT_ERRORS as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise AdapterError(
                f"{self.source}: PEFT cannot merge {self.peft_type} module {self.module!r} into a {kind} layer of "
                f"shape {tuple(weight.shape)}: {first}; is this the base model the adapter was trained on?"
            ) from None

    def _merged(
        self, torch: ModuleType, peft: ModuleType, kind: str, weight: np.ndarray, bias: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import set_peft_model_state_dict

        config = peft.PeftConfig.from_peft_type(**json.loads(self.config_json))
        config.inference_mode = True
        model = peft.get_peft_model(_mini_model(torch, self.module, _build_layer(torch, kind, weight, bias)), config)
        if not isinstance(model.base_model.model.get_submodule(self.module), BaseTunerLayer):
            raise AdapterError(
                f"{self.source}: adapter_config.json's target_modules do not select {self.module!r}, yet the adapter "
                "holds tensors for it: fix the config or the adapter"
            )
        state = {key: self._tensor(torch, key) for key in (*self.keys, *self.shared)}
        _fit_shared_buffers(model, state)
        loaded = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
        ours = f"{PEFT_PREFIX}{self.module}."
        unexpected = [k for k in loaded.unexpected_keys if k.startswith(ours)]
        missing = [k for k in loaded.missing_keys if k.startswith(ours) and any(f".{p}" in k for p in self.params)]
        if unexpected or missing:
            what = f"holds {unexpected[0]!r}, which" if unexpected else f"lacks {missing[0]!r}, which"
            raise AdapterError(
                f"{self.source}: {self.peft_type} module {self.module!r} {what} PEFT's layer for this config "
                "expects otherwise; the adapter file and adapter_config.json do not belong together"
            )
        merged = model.merge_and_unload().get_submodule(self.module)
        new_weight = merged.weight.detach().float().numpy()
        new_bias = None if bias is None or merged.bias is None else merged.bias.detach().float().numpy()
        return new_weight, new_bias

    def _tensor(self, torch: ModuleType, key: str) -> Any:
        """A saved tensor for PEFT's loader: floats in fp32 (bf16 and fp8 decoded), indices as the integers saved."""
        if _is_float(self.checkpoint, key):
            return torch.from_numpy(TensorRef(self.checkpoint, key).load())
        return torch.from_numpy(np.array(self.checkpoint.array(key)))


def _fit_shared_buffers(model: Any, state: dict[str, Any]) -> None:
    """Give the one-module model the saved model-level buffers (RandLoRA's projections): PEFT sized them for the
    largest layer of the whole model, and each layer reads its own slice of them."""
    from peft.tuners._buffer_dict import BufferDict

    for name, owner in model.named_modules():
        if not isinstance(owner, BufferDict):
            continue
        for adapter in list(owner.keys()):
            saved = state.get(f"{name}.{adapter}".removesuffix(f".{ADAPTER}"))
            if saved is not None and tuple(saved.shape) != tuple(owner[adapter].shape):
                owner[adapter] = saved.clone()


class ModuleMerge:
    """One computation for a module's two targets: whichever of weight and bias the kernel reaches first runs
    PEFT's merge and keeps the other's result, which the other takes when its input is the one that was used."""

    def __init__(self, spec: PeftModule) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # part -> (input it was computed from, result)

    def result(self, part: str, kind: str, own: np.ndarray, companion: np.ndarray | None) -> np.ndarray:
        """The merged ``part`` ("weight" or "bias") from its current values and the other part's."""
        other = "bias" if part == "weight" else "weight"
        with self._lock:
            kept = self._kept.pop(part, None)
            if kept is not None and np.array_equal(kept[0], own):
                return kept[1]
            weight, bias = (own, companion) if part == "weight" else (companion, own)
            assert weight is not None
            new_weight, new_bias = self.spec.merged(kind, weight, bias)
            mine, theirs = (new_weight, new_bias) if part == "weight" else (new_bias, new_weight)
            if companion is not None and theirs is not None:
                self._kept[other] = (companion, theirs)
            assert mine is not None
            return mine


@dataclass(frozen=True)
class PeftLayerEdit(Edit):
    """``part`` ("weight" or "bias") of one module, set to what PEFT's own layer merge gives (whole tensor).

    The plan establishes the layer (:meth:`oriented` records the Conv1D evidence, :meth:`bound` the base it
    reads the module's other tensor from); a strength below 1 moves the tensor part of the way to the merge.
    """

    merge: ModuleMerge = field(compare=False, repr=False, default=None)  # type: ignore[assignment]
    part: str = "weight"
    uses_bias: bool = False  # the tuner's merge reads or changes the bias: the layer is built with it
    strength: float = 1.0
    conv1d: bool | None = None
    shape: tuple[int, ...] = ()
    kind: str = ""
    companion: tuple[Checkpoint, str] | None = field(default=None, compare=False, repr=False)

    @property
    def whole_tensor(self) -> bool:
        return True

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        return replace(self, conv1d=conv1d, shape=tuple(shape))

    def bound(self, base: Checkpoint, key: str) -> Edit:
        """The edit for base tensor ``key``: the layer's type from the weight's shape and the Conv1D evidence, and
        where the module's other tensor (the weight of a bias, the bias of a weight) is read."""
        module = self.merge.spec.module
        stem = key.removesuffix("." + self.part)
        weight_key = f"{stem}.weight"
        if weight_key not in base.infos:
            raise AdapterError(f"{self.source_key!r}: the base has no {weight_key!r} for the layer PEFT would merge")
        weight_shape = tuple(base.infos[weight_key].shape)
        spec = self.merge.spec
        if f"{module}.weight".endswith(EMBEDDING_SUFFIXES) and "embedding" not in spec.layers:
            raise AdapterError(
                f"{self.adapter}: {module!r} is named as an embedding, which PEFT's {spec.peft_type} layer does not "
                "take; is this the base model the adapter was trained on?"
            )
        kind = layer_kind(module, weight_shape, self.conv1d, spec.layers, spec.embedding)
        if kind is None and (len(weight_shape) != 2 or self.conv1d is not None):
            what = "a GPT-2 Conv1D layer's" if self.conv1d else f"of shape {weight_shape}"
            raise AdapterError(
                f"{self.adapter}: {weight_key!r} is the weight {what}, which PEFT's {spec.peft_type} does not take; "
                "is this the base model the adapter was trained on?"
            )
        if kind is None:
            raise AdapterError(
                f"{self.adapter}: cannot tell whether {weight_key!r} {weight_shape} is a Linear or a GPT-2 Conv1D "
                f"layer, and PEFT's {spec.peft_type} merge differs between them: {ORIENTATION_FIX}"
            )
        companion = None
        if self.part == "bias":
            companion = (base, weight_key)
        elif self.uses_bias and f"{stem}.bias" in base.infos:
            companion = (base, f"{stem}.bias")
        return replace(self, kind=kind, companion=companion)

    @property
    def reads(self) -> tuple[str, ...]:
        return () if self.companion is None else (self.companion[1],)

    def _companion(self) -> np.ndarray | None:
        if self.companion is None:
            return None
        base, key = self.companion
        info = base.infos[key]
        return decode_f32(base.array(key), info.dtype).reshape(info.shape)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        if not self.kind:  # the plan's bound() established the layer; the runtime does not build layers
            raise AdapterError(
                f"{self.adapter}: {self.merge.spec.peft_type} module {self.merge.spec.module!r} is merged through "
                "PEFT's own layer, which only lorafuse merge does: merge the adapter into the model"
            )
        own = as_numpy(block).reshape(self.shape)
        merged = self.merge.result(self.part, self.kind, own.copy(), self._companion())
        if self.strength != 1.0:  # part of the way: own + s * (merged - own)
            merged = own + np.float32(self.strength) * (merged - own)
        _store(block, np.asarray(merged, dtype=F32).reshape(block.shape))

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, strength=self._times(self.strength, strength))

    def describe(self) -> dict[str, Any]:
        return {"kind": f"peft:{self.merge.spec.peft_type.lower()}", "part": self.part, "layer": self.kind or None}

    def refs(self) -> list[TensorRef]:
        spec = self.merge.spec
        return [TensorRef(spec.checkpoint, key) for key in spec.keys if _is_float(spec.checkpoint, key)]


def _is_float(checkpoint: Checkpoint, key: str) -> bool:
    return checkpoint.infos[key].code.startswith(("F", "BF"))


def as_numpy(values: Array) -> np.ndarray:
    """fp32 values as numpy: the CUDA kernel's blocks and the runtime's loaded tensors are torch tensors."""
    if isinstance(values, np.ndarray):
        return values
    return values.detach().float().cpu().numpy()


def _store(block: Array, values: np.ndarray) -> None:
    if isinstance(block, np.ndarray):
        block[...] = values
    else:
        import torch

        block.copy_(torch.from_numpy(values).to(block.device))


def read_through_peft(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    """Every module of ``tuner_input`` as PEFT's own layer merges it: a weight edit, and a bias edit where the
    tuner's merge changes the bias (``Tuner.extra["bias"]``; only where the base layer has one)."""
    tuner = tuner_of(tuner_input.config.peft_type)
    assert tuner is not None, "the reader of a registered tuner"
    config_json = json.dumps(tuner_input.config.raw, sort_keys=True)
    changes_bias = bool(tuner.extra.get("bias"))
    edits: list[TargetedEdit] = []
    for module, slots in tuner_input.modules.items():
        spec = PeftModule(
            tuner.peft_type,
            module,
            tuner_input.checkpoint,
            tuple(slots.values()),
            tuple(tuner_input.shared),
            config_json,
            tuner_input.source,
            tuner.params,
            tuple(tuner.extra.get("layers", LAYER_KINDS)),
            embedding=any("embedding" in slot for slot in slots),
        )
        merge = ModuleMerge(spec)
        first = next(iter(slots.values()))
        common = dict(adapter=tuner_input.label, source_key=first, merge=merge, uses_bias=changes_bias)
        edits.append(TargetedEdit(f"{module}.weight", PeftLayerEdit(part="weight", **common)))
        if changes_bias:
            edits.append(TargetedEdit(f"{module}.bias", PeftLayerEdit(part="bias", **common), optional=True))
    return edits, {module: 0 for module in tuner_input.modules}
