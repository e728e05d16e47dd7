"""The PEFT tuner registry: one module per tuner type (``peft_type`` in ``adapter_config.json``) registers how
its saved tensors become edits. formats/peft.py reads the config, groups the adapter's tensors by module with the
tuner's parameter names and hands each group to the tuner; tensors no tuner parameter names (``modules_to_save``,
trained biases, trainable tokens) stay with formats/peft.py. Adding a tuner type is adding a module here that
registers itself (and one import line in ``tuners/__init__.py``). No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..edits import TargetedEdit
from ..errors import AdapterError
from ..io.checkpoint import Checkpoint
from ..peft_flags import AdapterConfig


@dataclass
class TunerInput:
    """What a tuner reads one adapter from.

    ``modules``: module name (as in the trained model, PEFT's prefix removed) -> slot -> adapter tensor key; a
    slot is the tuner parameter's name, with ``.bias`` appended for a bias (``lora_B.bias``). ``shared``: tensors
    saved outside any module (VeRA's ``base_model.vera_A``), key -> key. ``config`` is the checked config, its
    ``raw`` the JSON object for the tuner's own keys. ``shape_of``: a base tensor's shape by its name in the
    trained model (None: unknown, or no base given), for tuners whose saved names do not say which tensor they
    change (LoRA's ``target_parameters``).
    """

    checkpoint: Checkpoint
    config: AdapterConfig
    modules: dict[str, dict[str, str]]
    label: str
    source: str
    shared: dict[str, str] = field(default_factory=dict)
    shape_of: Callable[[str], tuple[int, ...] | None] | None = None


@dataclass(frozen=True)
class Tuner:
    """One PEFT tuner type.

    ``peft_type``: PEFT's name (upper case, as ``PeftType`` values are). ``params``: the parameter names its
    layers save per module (``hada_w1_a``, ``ia3_l``, ...); ``shared``: names of tensors saved once for the
    whole model. ``read`` turns the grouped tensors into targeted edits and returns them with module -> rank
    (or another size for reports; 0 where a tuner has none). ``how``: "native" (numpy, exactly PEFT's math) or
    "peft" (PEFT's own layer merge, module by module; needs the ``peft`` extra; tuners/peft_layer.py), or
    "refused" (registered to refuse it with the reason: tuners/refused.py).
    """

    peft_type: str
    params: tuple[str, ...]
    read: Callable[[TunerInput], tuple[list[TargetedEdit], dict[str, int]]]
    how: str = "native"
    shared: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_TUNERS: dict[str, Tuner] = {}


def register_tuner(tuner: Tuner) -> Tuner:
    """Register ``tuner`` under its ``peft_type`` (upper case)."""
    key = tuner.peft_type.upper()
    if key in _TUNERS and _TUNERS[key] is not tuner:
        raise ValueError(f"PEFT tuner {key!r} registered twice")
    _TUNERS[key] = tuner
    return tuner


def tuner_of(peft_type: str) -> Tuner | None:
    """The registered tuner for ``peft_type`` (any case), or None."""
    return _TUNERS.get(peft_type.upper())


def registered_tuners() -> tuple[Tuner, ...]:
    """Every registered tuner, in registration order."""
    return tuple(_TUNERS.values())


def _key_re(params: Iterable[str]) -> re.Pattern[str]:
    names = "|".join(re.escape(p) for p in sorted(set(params), key=len, reverse=True))
    return re.compile(
        rf"^(?P<module>.+?)\.(?P<param>{names})"
        # the adapter name is never "weight"/"bias": those are the parameter (lora_B.bias must not read as one)
        r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<kind>weight|bias))?$"
    )


def group_tensors(
    names: Iterable[tuple[str, str]], tuner: Tuner, source: str
) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """Split adapter tensors, given as (name without PEFT's ``base_model.model.`` prefix, key), into (modules,
    shared, rest keys) for ``tuner`` (see :class:`TunerInput`).

    Two keys for one slot of one module (two adapter names saved in one file) are refused: never pick one.
    """
    pattern = _key_re(tuner.params) if tuner.params else None
    modules: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    rest: list[str] = []
    for name, key in names:
        stem = name.removeprefix("base_model.")
        if any(stem == s or stem.startswith(s + ".") for s in tuner.shared):
            shared[key] = key
            continue
        match = pattern.match(name) if pattern is not None else None
        if match is None:
            rest.append(key)
            continue
        slot = match["param"] + (".bias" if match["kind"] == "bias" else "")
        if tuner.how == "peft":  # PEFT's own loader takes the tensors: each keeps its saved name (adamss_A.0)
            slot = name[len(match["module"]) + 1 :]
        group = modules.setdefault(match["module"], {})
        if slot in group:
            raise AdapterError(
                f"{source}: {group[slot]!r} and {key!r} are the same {tuner.peft_type} tensor; keep one adapter"
            )
        group[slot] = key
    return modules, shared, rest
