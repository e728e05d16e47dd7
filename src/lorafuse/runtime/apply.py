"""Put adapters on a live ``torch.nn.Module`` and take them off again, without PEFT.

LoRA and DoRA edits on Linear / Conv1D / Embedding / Conv layers become :class:`LoraPatch` es inside a
:class:`LoraModule` wrapper (computed on the fly). Every other edit (``modules_to_save`` replacements, full
differences, LoRA on a layer type the runtime does not wrap) swaps the parameter for an edited copy; the original
is kept and put back by :func:`remove_adapter`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..edits import BiasDelta, DoraDelta, Edit, LoraDelta
from ..engine.cuda import TorchOps
from ..engine.kernel import matrix_shape, unedited_points
from ..errors import AdapterError, ShapeMismatchError
from ..names import layout_of
from ..plan import AdapterInput
from ..torch_bridge import to_torch
from .layers import LoraModule, LoraPatch, adapter_dtype, is_conv1d_layer, layer_kind

log = logging.getLogger("lorafuse")
STATE_ATTR = "_lorafuse_runtime"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class _MemRef:
    """A tensor already in memory, usable where an edit expects a TensorRef."""

    def __init__(self, tensor: torch.Tensor, name: str = "") -> None:
        self.tensor = tensor
        self.name = name
        self.file = "<memory>"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def load(self) -> torch.Tensor:
        return self.tensor.float()  # TorchOps copies it onto its device: edits change what they load

    def load_span(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.reshape(-1)[start:stop].to(dtype=torch.float32)


def _apply(edits: list[Edit], weight: torch.Tensor) -> None:
    """Apply ``edits`` in order to the fp32 ``weight`` in place, as the merge does: a DoRA edit's norm reads the
    weight as it was before its run of LoRA adapters' edits (engine/kernel.unedited_points)."""
    rows, cols = matrix_shape(tuple(weight.shape))
    ops = TorchOps(weight.device)
    block = weight.view(rows, cols)
    runs = unedited_points(edits)
    base = None
    for i, edit in enumerate(edits):
        if i in runs:
            base = block.clone() if runs[i] else None
        edit.apply(block, slice(0, rows), ops, base)


def _loaded(ref: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return TorchOps(device).load(ref).to(dtype)


@dataclass
class _SwapSlot:
    """A parameter replaced by an edited copy: the original and, in order, each adapter's edits to it."""

    module: nn.Module
    attr: str
    original: torch.Tensor
    entries: list[tuple[str, list[Edit]]] = field(default_factory=list)
    # Other places holding the same parameter (a tied head), swapped along when an adapter keeps the pair tied.
    tied: list[tuple[nn.Module, str]] = field(default_factory=list)

    def _set(self, value: Any) -> None:
        for module, attr in [(self.module, self.attr), *self.tied]:
            setattr(module, attr, value)

    def rebuild(self) -> None:
        if not self.entries:
            self._set(self.original)
            return
        weight = self.original.detach().float().clone()
        edits = [edit for _name, edits in self.entries for edit in edits]
        _apply(sorted(edits, key=lambda edit: not edit.goes_first), weight)  # a saved base copy first, as plan.py
        value = weight.to(self.original.dtype)
        self._set(nn.Parameter(value, requires_grad=False) if isinstance(self.original, nn.Parameter) else value)


@dataclass
class RuntimeState:
    """What the runtime added to a model (kept on the model as ``_lorafuse_runtime``)."""

    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> info (label, injected config)
    slots: dict[tuple[int, str], _SwapSlot] = field(default_factory=dict)
    counter: int = 0


def runtime_state(model: nn.Module, create: bool = True) -> RuntimeState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = RuntimeState()
        model.__dict__[STATE_ATTR] = state
    return state


def parameter_table(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every parameter and buffer by the name it has without runtime wrappers: name -> (owning module, attribute)."""
    table: dict[str, tuple[nn.Module, str]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, LoraModule):
            walk(module.base_layer, prefix)
            return
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                table[prefix + attr] = (module, attr)
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{child_name}.")

    walk(model, "")
    return table


def lora_modules(model: nn.Module) -> list[tuple[str, LoraModule]]:
    """Every runtime wrapper with its module name (as the unwrapped model names it)."""
    found: list[tuple[str, LoraModule]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, LoraModule):
            found.append((prefix[:-1], module))
            walk(module.base_layer, prefix)
            return
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{child_name}.")

    walk(model, "")
    return found


def _parent_links(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every place ``target`` is a child (a layer can be shared)."""
    return [
        (parent, name)
        for parent in model.modules()
        for name, child in parent._modules.items()
        if child is target and not isinstance(parent, LoraModule)
    ]


def unwrappable(model: nn.Module) -> set[int]:
    """Layers a wrapper would not see called: nn.MultiheadAttention uses its out_proj's weight directly."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def wrap_layer(model: nn.Module, layer: nn.Module) -> LoraModule:
    """The wrapper around ``layer``, creating it (and putting it in the model) when there is none yet."""
    for parent in model.modules():
        if isinstance(parent, LoraModule) and parent.base_layer is layer:
            return parent
    kind = layer_kind(layer)
    assert kind is not None
    wrapper = LoraModule(layer, kind)
    links = _parent_links(model, layer)
    if not links:
        raise AdapterError("cannot wrap the model itself: apply the adapter to the model that contains the layer")
    for parent, name in links:
        setattr(parent, name, wrapper)
    return wrapper


def unwrap_layer(model: nn.Module, wrapper: LoraModule) -> None:
    """Put the base layer back in place of an empty wrapper."""
    for parent, name in _parent_links(model, wrapper):
        setattr(parent, name, wrapper.base_layer)


@dataclass
class _Pending:
    module: nn.Module
    key: str
    edit: LoraDelta
    bias: BiasDelta | None = None


def _read(adapter: str | Path | AdapterInput, table: dict[str, tuple[nn.Module, str]]) -> tuple[AdapterInput, bool]:
    if isinstance(adapter, AdapterInput):
        return adapter, False
    from ..formats import read_adapter

    # The live model's names and shapes let formats such as kohya resolve their tensor names.
    shapes = {name: tuple(getattr(module, attr).shape) for name, (module, attr) in table.items()}
    return read_adapter(Path(adapter), base_shapes=shapes), True


def _check_name(name: str, state: RuntimeState) -> None:
    if not _NAME_RE.match(name):
        raise AdapterError(f"adapter name {name!r} may hold only letters, digits, '_' and '-'")
    if name in state.adapters:
        raise AdapterError(f"the model already has an adapter named {name!r}: pass another name or remove it first")


def _make_patch(pending: _Pending, layer: nn.Module) -> LoraPatch:
    edit = pending.edit
    dtype = adapter_dtype(layer.weight)
    device = layer.weight.device
    kind = layer_kind(layer)
    assert kind is not None
    A = _loaded(edit.A, device, dtype)
    B = _loaded(edit.B, device, dtype)
    magnitude = None
    if isinstance(edit, DoraDelta) and edit.magnitude is not None:
        magnitude = _loaded(edit.magnitude, device, dtype)
    bias = None
    if pending.bias is not None:
        # PEFT scales lora_B's bias with the LoRA scaling; a different bias scale is folded into the values.
        factor = pending.bias.scale / edit.scale if edit.scale else 0.0
        bias = _loaded(pending.bias.b, device, dtype) * factor
    transposed = kind == "embedding" or edit.layout == "transposed"
    return LoraPatch(kind, A, B, edit.scale, transposed=transposed, bias=bias, magnitude=magnitude)


def apply_adapter(
    model: nn.Module, adapter: str | Path | AdapterInput, weight: float = 1.0, name: str | None = None
) -> str:
    """Put ``adapter`` on ``model`` (computed on the fly, base weights untouched) and return its name.

    ``adapter`` is an adapter path in any format :func:`lorafuse.formats.read_adapter` reads, or an already read
    :class:`~lorafuse.plan.AdapterInput` (whose own ``weight`` multiplies ``weight``). The adapter's tensor names
    must match the model's parameter names (up to leading components, e.g. ``model.`` or ``bert.``). Several
    adapters can be applied; their outputs add up in the order they were applied. Raises
    :class:`~lorafuse.errors.LorafuseError` subclasses (nothing is changed on the model then).
    """
    state = runtime_state(model)
    assert state is not None
    table = parameter_table(model)
    inp, owned = _read(adapter, table)
    if name is None:
        while f"adapter{state.counter}" in state.adapters:
            state.counter += 1
        name = f"adapter{state.counter}"
    _check_name(name, state)
    strength = float(weight) * float(inp.weight)
    matcher = layout_of(list(table))
    pending: dict[int, _Pending] = {}  # id(layer) -> its LoRA edit
    swaps: dict[tuple[int, str], tuple[nn.Module, str, list[Edit]]] = {}
    bias_edits: list[tuple[nn.Module, BiasDelta]] = []
    skip = unwrappable(model)
    try:
        for targeted in inp.edits:
            key = matcher.resolve(targeted.target)
            if key is None and targeted.optional and not matcher.ambiguous(targeted.target):
                continue  # a target the model may lack (IA3 on a layer without a bias)
            if key is None:
                candidates = matcher.ambiguous(targeted.target)
                where = f"matches several ({', '.join(candidates[:3])})" if candidates else "is not in the model"
                raise ShapeMismatchError(
                    f"{inp.label}: {targeted.edit.source_key or targeted.target!r} targets {targeted.target!r}, "
                    f"which {where}: is this the model the adapter was trained on?"
                )
            module, attr = table[key]
            tensor = getattr(module, attr)
            edit = targeted.edit.oriented(tuple(tensor.shape), is_conv1d_layer(module)).scaled(strength)
            err = edit.shape_error(tuple(tensor.shape))
            if err:
                raise ShapeMismatchError(
                    f"{inp.label}: {edit.source_key!r} does not fit {key!r}: {err}; "
                    "is this the model the adapter was trained on?"
                )
            if not tensor.is_floating_point():
                raise AdapterError(f"{inp.label}: {key!r} is {tensor.dtype}; apply adapters to an unquantized model")
            kind = None if id(module) in skip else layer_kind(module)
            if isinstance(edit, LoraDelta) and attr == "weight" and kind is not None and id(module) not in pending:
                if kind == "embedding" and edit.layout != "transposed":
                    raise ShapeMismatchError(f"{inp.label}: {edit.source_key!r} is not an embedding LoRA for {key!r}")
                pending[id(module)] = _Pending(module, key, edit)
            elif isinstance(edit, BiasDelta) and attr == "bias":
                bias_edits.append((module, edit))
            else:
                if isinstance(edit, LoraDelta):
                    log.info("%s: %s is a %s, merged into a swapped copy", inp.label, key, type(module).__name__)
                swaps.setdefault((id(module), attr), (module, attr, []))[2].append(edit)
        for module, edit in bias_edits:
            if id(module) in pending and pending[id(module)].bias is None:
                pending[id(module)].bias = edit
            else:
                swaps.setdefault((id(module), "bias"), (module, "bias", []))[2].append(edit)
        patches = [(p.module, _make_patch(p, p.module)) for p in pending.values()]
        frozen = {key: (m, a, [_in_memory(e) for e in edits]) for key, (m, a, edits) in swaps.items()}
    finally:
        if owned:
            _close(inp)
    # Everything is read and checked: now change the model.
    folding = {id(m): m for m, _attr, edits in frozen.values() if not all(e.goes_first for e in edits)}
    for module in folding.values():  # a saved base copy is the base: swapping it in needs no folding
        _fold_patches(model, state, module, inp.keep_tied)
    for layer, patch in patches:
        wrap_layer(model, layer).lora[name] = patch
    for module, attr, edits in frozen.values():
        slot = _slot(model, state, module, attr, inp.keep_tied)
        slot.entries.append((name, edits))
        slot.rebuild()
    state.adapters[name] = {"label": inp.label, "weight": strength, "layers": len(patches), "swapped": len(frozen)}
    state.counter += 1
    return name


def _slot(model: nn.Module, state: RuntimeState, module: nn.Module, attr: str, keep_tied: bool) -> _SwapSlot:
    """The swap slot of ``module.attr``, created (keeping the original) when there is none yet."""
    slot = state.slots.get((id(module), attr))
    if slot is None:
        original = getattr(module, attr)
        tied = _sharers(model, module, attr, original) if keep_tied else []
        slot = state.slots[(id(module), attr)] = _SwapSlot(module, attr, original, tied=tied)
    return slot


def _wrapper_of(model: nn.Module, module: nn.Module) -> LoraModule | None:
    return next((m for m in model.modules() if isinstance(m, LoraModule) and m.base_layer is module), None)


def _fold_patches(model: nn.Module, state: RuntimeState, module: nn.Module, keep_tied: bool) -> None:
    """Move the earlier adapters' LoRA patches of ``module`` into its swapped parameters, in adapter order.

    A swapped copy is what a wrapped layer computes with before its patches add their outputs, so an edit that is
    swapped in (IA3, OFT ...) after an adapter whose LoRA is a patch would apply before that LoRA: the merge applies
    it after (it scales the LoRA-merged weight). Folded, the LoRA joins the copy in its place in the order.
    """
    wrapper = _wrapper_of(model, module)
    if wrapper is None or not len(wrapper.lora):
        return
    order = list(state.adapters)
    for attr in ("weight", "bias"):
        folded = []
        for adapter, patch in wrapper.lora.items():
            if attr == "weight":
                folded.append((adapter, [patch_edit(patch)]))
            elif patch.lora_bias is not None:
                folded.append((adapter, [BiasDelta(_MemRef(patch.lora_bias.detach()), patch.scale)]))
        if folded:
            slot = _slot(model, state, module, attr, keep_tied)
            slot.entries = sorted(slot.entries + folded, key=lambda entry: order.index(entry[0]))
            slot.rebuild()
    wrapper.lora.clear()
    unwrap_layer(model, wrapper)


def _sharers(model: nn.Module, module: nn.Module, attr: str, value: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Other (module, attribute) places of ``model`` that hold the very same parameter (tied weights)."""
    return [
        (m, name)
        for m in model.modules()
        for name, p in m._parameters.items()
        if p is value and not (m is module and name == attr)
    ]


def _in_memory(edit: Edit) -> Edit:
    """A copy of ``edit`` whose tensors are loaded, so the adapter file may go away."""
    from dataclasses import fields, replace

    changes = {}
    for f in fields(edit):
        value = getattr(edit, f.name)
        if isinstance(value, Edit):  # an update another edit wraps (LyCORIS DoRA's LoRA, LoHa, LoKr)
            changes[f.name] = _in_memory(value)
        elif hasattr(value, "checkpoint") and hasattr(value, "load"):
            changes[f.name] = _MemRef(to_torch(value.load()), value.name)
    return replace(edit, **changes)


def _close(inp: AdapterInput) -> None:
    for targeted in inp.edits:
        for ref in targeted.edit.refs():
            ref.checkpoint.close()


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters on ``model``, in the order they were applied."""
    state = runtime_state(model, create=False)
    return list(state.adapters) if state else []


def remove_adapter(model: nn.Module, name: str | None = None) -> None:
    """Take adapter ``name`` (default: every adapter) off ``model``, restoring the original layers and parameters."""
    state = runtime_state(model, create=False)
    names = adapter_names(model) if name is None else [name]
    if name is not None and (state is None or name not in state.adapters):
        raise AdapterError(
            f"the model has no adapter named {name!r} (it has: {', '.join(adapter_names(model)) or 'none'})"
        )
    for _module_name, wrapper in lora_modules(model):
        for n in names:
            if n in wrapper.lora:
                del wrapper.lora[n]
        if not len(wrapper.lora):
            unwrap_layer(model, wrapper)
    if state is None:
        return
    for key, slot in list(state.slots.items()):
        before = len(slot.entries)
        slot.entries = [(n, e) for n, e in slot.entries if n not in names]
        if len(slot.entries) != before:
            slot.rebuild()
        if not slot.entries:
            del state.slots[key]
    for n in names:
        state.adapters.pop(n, None)


def patch_edit(patch: LoraPatch) -> LoraDelta:
    """The merge edit equivalent to ``patch`` (same math as ``lorafuse merge``)."""
    layout = "conv" if patch.kind == "conv" else ("transposed" if patch.transposed else "linear")
    A, B = _MemRef(patch.lora_A.detach()), _MemRef(patch.lora_B.detach())
    if patch.magnitude is not None:
        return DoraDelta(
            A,
            B,
            patch.scale,
            layout,
            magnitude=_MemRef(patch.magnitude.detach()),
            output_dim=1 if patch.transposed else 0,
        )
    return LoraDelta(A, B, patch.scale, layout)


def _shared(model: nn.Module, tensor: torch.Tensor) -> bool:
    return sum(1 for _n, p in model.named_parameters(remove_duplicate=False) if p is tensor) > 1


@torch.no_grad()
def merge_into(model: nn.Module) -> nn.Module:
    """Fold every adapter into the model's weights and remove the wrappers (like PEFT's ``merge_and_unload``).

    The math is ``lorafuse merge``'s (DoRA norms from the unmerged weight). A weight shared with another layer (a
    tied embedding and head) is given its own copy first, so the other layer keeps computing what it computed.
    """
    state = runtime_state(model, create=False)
    for module_name, wrapper in lora_modules(model):
        base = wrapper.base_layer
        if len(wrapper.lora):
            weight = base.weight.detach().float().clone()
            _apply([patch_edit(patch) for patch in wrapper.lora.values()], weight)  # one run of LoRA edits
            for patch in wrapper.lora.values():
                if patch.lora_bias is not None:
                    if getattr(base, "bias", None) is None:
                        log.warning("%s has no bias: its adapter's lora_B bias cannot be merged (dropped)", module_name)
                    else:
                        base.bias.add_((patch.lora_bias.detach() * patch.scale).to(base.bias.dtype))
            value = weight.to(base.weight.dtype)
            if _shared(model, base.weight):
                log.warning(
                    "%s.weight is shared with another layer (tied): giving %s its own copy", module_name, module_name
                )
                base.weight = nn.Parameter(value, requires_grad=base.weight.requires_grad)
                config = getattr(model, "config", None)
                if config is not None and hasattr(config, "tie_word_embeddings"):
                    config.tie_word_embeddings = False
            else:
                base.weight.copy_(value)
        unwrap_layer(model, wrapper)
    if state is not None:
        model.__dict__.pop(STATE_ATTR, None)
    return model
