"""LoRA on parameters (``LoraConfig(target_parameters=...)``, PEFT's ``lora.ParamWrapper``), as PEFT merges it.

This is how LoRA reaches the experts of transformers 5 MoE models: fused 3-D parameters (experts, out, in) or,
where the model stores them transposed (gpt-oss), (experts, in, out). PEFT gives each targeted parameter one
lora_A (r * experts, in) and lora_B (out, r * experts); expert e's update is ``scale * B[:, e::E] @ A[e*r:(e+1)*r]``
(rows of A are expert-major, columns of B rank-major), transposed for a transposed parameter. A 2-D parameter is
one expert: ``scale * B @ A`` in the parameter's own (out, in), whatever its layer class.

PEFT saves these factors under the module that holds the parameter, one wrapper per parameter nested in the
order it wrapped them (``experts.lora_A``, ``experts.base_layer.lora_A``, ...), never under the parameter's name.
Which saved pair belongs to which targeted parameter is therefore read from the base's shapes: exactly one
parameter must fit each pair, or the adapter is refused. Where the checkpoint stores one 2-D weight per expert
instead of the fused parameter (the Hub's Qwen-MoE files, which transformers fuses on loading), expert e's share
goes to each of its weights as a plain LoRA on slices of the factors (:data:`PER_EXPERT_PARTS`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..conv1d import NO_CONV1D
from ..edits import Array, BlockOps, Edit, LoraDelta, TargetedEdit, TensorRef
from ..errors import AdapterError
from ..peft_flags import AdapterConfig, _shown
from .registry import TunerInput

BASE_LAYER = ".base_layer"
EXPERTS_FIX = (
    "pass the base model folder with its config.json (its model type tells how the experts are stored), or "
    f"--conv1d-modules NAMES naming the modules whose experts are stored (experts, in, out) ({NO_CONV1D}: none are)"
)


def target_parameters(config: AdapterConfig, source: str) -> list[str]:
    """The config's ``target_parameters`` (parameter names, or their last parts)."""
    value = config.raw.get("target_parameters")
    if value in (None, []):
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterError(f"{source}: target_parameters must list parameter names, not {_shown(value)}")
    return value


def wrapped_module(name: str) -> str:
    """The module a ParamWrapper group saved at ``name`` wraps (its ``.base_layer`` nesting removed)."""
    return name.replace(BASE_LAYER, "")


def candidates(module: str, targets: list[str]) -> list[str]:
    """The parameters of ``module`` that ``target_parameters`` names (PEFT matches ``key.endswith('.' + t)``)."""
    found = []
    for target in targets:
        owner, _, param = target.rpartition(".")
        if not owner or module == owner or module.endswith("." + owner):
            key = f"{module}.{param}"
            if key not in found:
                found.append(key)
    return found


@dataclass(frozen=True)
class ParamLoraDelta(Edit):
    """A ``target_parameters`` LoRA on a 2-D parameter (out, in) or a 3-D experts parameter.

    ``transposed``: the experts are stored (experts, in, out); None until the plan orients the edit.
    """

    A: TensorRef
    B: TensorRef
    scale: float
    experts: int = 0  # 0: a 2-D parameter
    transposed: bool | None = False

    def refs(self) -> list[TensorRef]:
        return [self.A, self.B]

    @property
    def rank(self) -> int:
        return self.A.shape[0] // max(self.experts, 1)

    def delta_shape(self, transposed: bool | None = None) -> tuple[int, ...]:
        out, inp = self.B.shape[0], self.A.shape[1]
        if not self.experts:
            return (out, inp)
        flipped = self.transposed if transposed is None else transposed
        return (self.experts, inp, out) if flipped else (self.experts, out, inp)

    def factor_error(self) -> str | None:
        """Why lora_A/lora_B are no factors of ``experts`` experts, or None."""
        a, b = self.A.shape, self.B.shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or not a[0] or a[0] % max(self.experts, 1):
            return f"lora_A {a} and lora_B {b} are not LoRA factors of {max(self.experts, 1)} expert(s)"
        return None

    def shape_error(self, shape: tuple[int, ...]) -> str | None:
        err = self.factor_error()
        if err:
            return err
        if tuple(shape) != self.delta_shape():
            return f"the adapter's update has shape {self.delta_shape()} but the parameter is {tuple(shape)}"
        return None

    def oriented(self, shape: tuple[int, ...], conv1d: bool | None) -> Edit:
        """A 2-D parameter has one orientation (PEFT reads in/out from its shape); experts follow ``conv1d`` (True:
        stored (experts, in, out)), or the shape where only one orientation fits."""
        if not self.experts:
            return self
        if conv1d is not None:
            return replace(self, transposed=conv1d)
        fitting = [t for t in (False, True) if tuple(shape) == self.delta_shape(t)]
        if len(fitting) == 2:
            raise AdapterError(
                f"{self.adapter}: {self.source_key!r} updates experts {tuple(shape)} that may be stored (experts, "
                f"out, in) or (experts, in, out), and the base model does not say which: {EXPERTS_FIX}"
            )
        return replace(self, transposed=fitting[0]) if fitting else self

    def factors(self, ops: BlockOps) -> tuple[Array, Array]:
        """(A as (experts, r, in), scale * B as (experts, out, r)); B's columns are rank-major (r * E + e)."""

        def make() -> tuple[Array, Array]:
            experts, rank = max(self.experts, 1), self.rank
            a = self.A.load().reshape(experts, rank, -1)
            b = self.B.load() * np.float32(self.scale)
            b = b.reshape(b.shape[0], rank, experts).transpose(2, 0, 1)  # (out, r * E + e) -> (E, out, r)
            return ops.array(np.ascontiguousarray(a)), ops.array(np.ascontiguousarray(b))

        return ops.cached(self, "factors", make)

    def apply(self, block: Array, rows: slice, ops: BlockOps, base: Array | None = None) -> None:
        a, b = self.factors(ops)
        if not self.experts:  # rows of the (out, in) parameter
            block += ops.product(b[0][rows], a[0])
            return
        for i, expert in enumerate(range(rows.start, rows.stop)):  # one row per expert, flattened
            if self.transposed:  # (in, out) = A_e^T (s B_e)^T
                delta = ops.product(ops.contiguous(a[expert].T), ops.contiguous(b[expert].T))
            else:
                delta = ops.product(b[expert], a[expert])
            block[i] += delta.reshape(-1)

    def scaled(self, strength: float) -> Edit:
        return self if strength == 1.0 else replace(self, scale=self._times(self.scale, strength))

    def describe(self) -> dict[str, Any]:
        shape = list(self.delta_shape()) if self.transposed is not None else None
        return {"kind": "lora", "rank": self.rank, "scale": self.scale, "experts": self.experts, "shape": shape}

    def no_effect(self, load: Callable[[TensorRef], np.ndarray] = TensorRef.load) -> bool:
        return not load(self.B).any()


# Checkpoints that store experts one 2-D weight per expert (the Hub's Qwen-MoE, DeepSeek, Mixtral, ... files):
# transformers stacks them into the fused parameter on loading (conversion_mapping.py: MergeModulelist(dim=0), then
# Concatenate(dim=1) of the parts), so expert e's rows of the fused parameter are its parts' rows in this order.
PER_EXPERT_PARTS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}


@dataclass(frozen=True)
class StoredParameter:
    """How the base stores a targeted parameter: whole (``parts`` empty), or as one (out, in) weight per expert
    and part (``parts``: name template with ``{e}``, rows of that part). ``shape`` is the parameter's."""

    shape: tuple[int, ...]
    parts: tuple[tuple[str, int], ...] = ()


def stored_parameter(key: str, shape_of: Callable[[str], tuple[int, ...] | None]) -> StoredParameter | None:
    """How the base stores parameter ``key``, or None when it has no such parameter."""
    whole = shape_of(key)
    if whole is not None:
        return StoredParameter(tuple(whole))
    module, _, param = key.rpartition(".")
    for names in PER_EXPERT_PARTS.get(param, ()):
        templates = [f"{module}.{{e}}.{name}.weight" for name in names]
        first = [shape_of(t.format(e=0)) for t in templates]
        if any(s is None or len(s) != 2 or s[1] != first[0][1] for s in first):  # type: ignore[index]
            continue
        experts = 0
        while all(shape_of(t.format(e=experts)) == s for t, s in zip(templates, first)):
            experts += 1
        rows = [s[0] for s in first]  # type: ignore[index]
        return StoredParameter((experts, sum(rows), first[0][1]), tuple(zip(templates, rows)))  # type: ignore[index]
    return None


@functools.lru_cache(maxsize=8)
def _whole(checkpoint: Any, name: str) -> np.ndarray:
    """A factor read once for all its experts' slices (a rank-16 LoRA on 128 experts is sliced 384 times per
    layer); read-only, kept for the few parameters being merged at a time."""
    values = TensorRef(checkpoint, name).load()
    values.flags.writeable = False
    return values


@dataclass(frozen=True)
class SlicedRef(TensorRef):
    """Rows ``rows`` and columns ``cols`` (start, stop, step) of a 2-D adapter tensor: one expert's share of a
    parameter LoRA's factors, as a plain LoRA factor."""

    rows: tuple[int, int, int] = (0, 0, 1)
    cols: tuple[int, int, int] = (0, 0, 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(range(*self.rows)), len(range(*self.cols)))

    def load(self) -> np.ndarray:
        """The slice in fp32, a copy the caller owns (edits scale their factors in place)."""
        return np.array(_whole(self.checkpoint, self.name)[slice(*self.rows), slice(*self.cols)], copy=True)


def _existing(keys: list[str], shape_of: Callable[[str], tuple[int, ...] | None] | None) -> list[str]:
    return keys if shape_of is None else [k for k in keys if stored_parameter(k, shape_of) is not None]


def is_parameter_group(name: str, targets: list[str], shape_of: Callable[[str], Any] | None) -> bool:
    """Whether the LoRA group saved at ``name`` is a ParamWrapper's: nested (``.base_layer``), or on a module one
    of whose (existing) parameters ``target_parameters`` names."""
    return bool(targets) and (
        BASE_LAYER in name or bool(_existing(candidates(wrapped_module(name), targets), shape_of))
    )


def _fits(edit: ParamLoraDelta, stored: StoredParameter) -> bool:
    shape = stored.shape
    if len(shape) == 3:
        edit = replace(edit, experts=shape[0])
        orientations = (False,) if stored.parts else (False, True)  # per-expert weights are (out, in)
        return edit.factor_error() is None and shape in [edit.delta_shape(t) for t in orientations]
    return len(shape) == 2 and edit.factor_error() is None and shape == edit.delta_shape()


def _per_expert_edits(edit: ParamLoraDelta, stored: StoredParameter) -> list[TargetedEdit]:
    """Expert e's share of ``edit`` on each of its stored weights: plain LoRAs on sliced factors."""
    experts, rank = stored.shape[0], edit.rank
    out = []
    for e in range(experts):
        a = SlicedRef(edit.A.checkpoint, edit.A.name, rows=(e * rank, (e + 1) * rank, 1), cols=(0, edit.A.shape[1], 1))
        offset = 0
        for template, rows in stored.parts:
            # B's columns are rank-major: expert e's are e, e + E, ...
            b = SlicedRef(
                edit.B.checkpoint, edit.B.name, rows=(offset, offset + rows, 1), cols=(e, edit.B.shape[1], experts)
            )
            offset += rows
            lora = LoraDelta(a, b, edit.scale, "linear", adapter=edit.adapter, source_key=edit.source_key)
            out.append(TargetedEdit(template.format(e=e), lora))
    return out


def read_parameter_loras(
    tuner_input: TunerInput, groups: dict[str, dict[str, str]], targets: list[str]
) -> tuple[list[TargetedEdit], dict[str, int]]:
    """The edits of the ParamWrapper groups (module name as saved -> slot -> key), each matched by shape to the
    one targeted parameter of its module that fits it."""
    checkpoint, config, source = tuner_input.checkpoint, tuner_input.config, tuner_input.source
    shape_of = tuner_input.shape_of
    edits: list[TargetedEdit] = []
    ranks: dict[str, int] = {}
    claimed: dict[str, str] = {}
    for name, slots in groups.items():
        if "lora_A" not in slots or "lora_B" not in slots:
            raise AdapterError(f"{source}: parameter LoRA {name!r} lacks lora_A or lora_B; the adapter is incomplete")
        extra = sorted(set(slots) - {"lora_A", "lora_B"})
        if extra:
            raise AdapterError(f"{source}: parameter LoRA {name!r} has {extra[0]}, which PEFT's ParamWrapper has not")
        module = wrapped_module(name)
        edit = ParamLoraDelta(
            TensorRef(checkpoint, slots["lora_A"]),
            TensorRef(checkpoint, slots["lora_B"]),
            1.0,
            adapter=tuner_input.label,
            source_key=slots["lora_B"],
        )
        keys = _existing(candidates(module, targets), shape_of)
        if shape_of is None:
            if len(keys) != 1:
                raise AdapterError(
                    f"{source}: {name!r} is a LoRA on one of the parameters {', '.join(keys) or 'none'}, and only "
                    "the base model's shapes tell which: pass the base model"
                )
            fitting = keys
        else:
            fitting = [k for k in keys if _fits(edit, stored_parameter(k, shape_of))]  # type: ignore[arg-type]
        if len(fitting) != 1:
            which = f"{', '.join(fitting)} all fit" if fitting else f"none of {', '.join(keys) or 'no parameter'} fits"
            raise AdapterError(
                f"{source}: {name!r} ({edit.A.shape}, {edit.B.shape}) is a LoRA on a targeted parameter of "
                f"{module!r}, and {which}: is this the base model the adapter was trained on?"
            )
        key = fitting[0]
        if key in claimed:
            raise AdapterError(f"{source}: {claimed[key]!r} and {name!r} both fit parameter {key!r}; refusing to guess")
        claimed[key] = name
        stored = stored_parameter(key, shape_of) if shape_of is not None else None
        experts = stored.shape[0] if stored is not None and len(stored.shape) == 3 else 0
        edit = replace(edit, experts=experts, transposed=None if experts else False)
        err = edit.factor_error()
        if err:
            raise AdapterError(f"{source}: {name!r}: {err}; the adapter file is broken")
        edit = replace(edit, scale=config.scaling(key, edit.rank))
        ranks[key] = edit.rank
        if stored is not None and stored.parts:
            edits.extend(_per_expert_edits(edit, stored))
        else:
            edits.append(TargetedEdit(key, edit))
    return edits, ranks
