"""adapter_config.json read and checked, PEFT's LoRA scaling, and the one check of every strength and scale.

No torch here: formats/peft.py and ``ADAPTER_CONFIG_JSON`` (sources/adapter_config.py) read configs with the same
:func:`load_config`, so both give the same verdict on every config. Every number that scales a merge
(``lora_alpha``, ``r``, ``rank_pattern``/``alpha_pattern`` values, ``--weight``, ``--alpha``, ``--weights``, the
computed scales) goes through :func:`finite_number` or :func:`positive_int`: NaN, Inf, booleans and strings are
refused with one line naming the key or flag, the value and the fix.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterError, InputError, LorafuseError

CONFIG_NAME = "adapter_config.json"
# Initialisations that change the base weights while training (the saved A and B apply to that changed base):
# PiSSA, OLoRA, CorDA and LoftQ take principal components out of it, LoRA-GA an offset from its gradients.
UNSUPPORTED_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoRA options lorafuse refuses, each with why (tuners/lora_variants.py has the variants it merges).
UNSUPPORTED_FLAGS = {
    "use_qalora": "QALoRA pools the input in groups before lora_A, which no merged weight computes (PEFT cannot "
    "merge it either)",
    "layer_replication": "layer_replication adds layers that share the base's weights, so the merged model is not "
    "the base's layout; merge it with PEFT's merge_and_unload()",
    "arrow_config": "Arrow routes each token among LoRA experts, so no single merged weight exists (PEFT cannot "
    "merge it either)",
    "alora_invocation_tokens": "aLoRA acts only after its invocation tokens, which no merged weight computes (PEFT "
    "cannot merge it either)",
}
BIAS_VALUES = ("none", "all", "lora_only")  # PEFT's choices for ``bias``
BOOL_FLAGS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "ensure_weight_tying")
ALPHA_FIX = "set it to the lora_alpha the adapter was trained with"
RANK_FIX = "set it to the LoRA rank (the rows of lora_A)"


def _shown(value: Any) -> str:
    """A value as the user wrote it, cut short (a config may hold anything)."""
    try:
        text = repr(value)
    except RecursionError:
        return "a deeply nested value"
    return text if len(text) <= 60 else text[:57] + "..."


def finite_number(value: Any, what: str, fix: str, error: type[LorafuseError] = LorafuseError) -> float:
    """``value`` as a float when it is a finite real number; else ``error`` naming ``what``, the value and ``fix``.

    Booleans and strings are not numbers (``"0.5"`` in a JSON config is a typo, not a strength).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{what} is {_shown(value)}, not a number: {fix}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise error(f"{what} is {_shown(value)}, not a finite number: {fix}")
    return number


def positive_int(value: Any, what: str, fix: str, error: type[LorafuseError] = AdapterError) -> int:
    """``value`` when it is a whole number of at least 1 (not a bool, not 8.0); else ``error`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{what} is {_shown(value)}, not a whole number of at least 1: {fix}")
    return value


def strengths(values: Sequence[Any], flag: str) -> list[float]:
    """Per-adapter strengths (``--weight``, ``--weights``) as floats, each finite."""
    fix = f"give each adapter's strength as a finite number, e.g. {flag} 0.5"
    return [finite_number(v, flag, fix) for v in values]


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale of ``B @ A``: alpha / r, or alpha / sqrt(r) with rsLoRA (``rank`` >= 1, checked by the reader)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _regex(pattern: str, what: str, source: str) -> None:
    """Refuse a pattern ``re`` cannot compile (PEFT would crash on it when wrapping modules)."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(
            f"{source}: {what} {_shown(pattern)} is not a valid regular expression ({exc}): fix it in {CONFIG_NAME}"
        ) from None


def _pattern_regex(key: str) -> str:
    """How PEFT matches a ``rank_pattern``/``alpha_pattern`` key: the end of a module name, at a dot boundary."""
    return rf"(.*\.)?({key})$"


def _patterns(data: dict[str, Any], key: str, source: str, check) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(
            f"{source}: {key} must map module names to numbers, not {_shown(value)}: fix it in {CONFIG_NAME}"
        )
    checked: dict[str, Any] = {}
    for name, number in value.items():
        # JSON object keys are always strings; a mapping passed through the API may hold others.
        if not isinstance(name, str) or not name:
            raise AdapterError(f"{source}: {key} key {_shown(name)} is not a module name: fix it in {CONFIG_NAME}")
        _regex(_pattern_regex(name), f"{key} key", source)
        checked[name] = check(number, f"{source}: {key}[{name!r}]")
    return checked


def _target_modules(value: Any, source: str) -> str | list[str] | None:
    """PEFT's ``target_modules``: a regular expression (matched against whole module names) or a list of names."""
    if value is None:
        return None
    if isinstance(value, str):
        _regex(value, "target_modules", source)
        return value
    if not isinstance(value, list):
        raise AdapterError(
            f"{source}: target_modules must be a list of module names or a regular expression, not "
            f"{_shown(value)}: fix it in {CONFIG_NAME}"
        )
    for index, name in enumerate(value):
        if not isinstance(name, str):
            raise AdapterError(
                f"{source}: target_modules entry {index} ({_shown(name)}) is not a module name: fix it in {CONFIG_NAME}"
            )
    return list(value)


def _names(data: dict[str, Any], key: str, source: str) -> list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError(
            f"{source}: {key} must be a list of module names, not {_shown(value)}: fix it in {CONFIG_NAME}"
        )
    return list(value)


def _optional_str(data: dict[str, Any], key: str, source: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise AdapterError(f"{source}: {key} must be a string, not {_shown(value)}: fix it in {CONFIG_NAME}")
    return value


def _flag(data: dict[str, Any], key: str, source: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):  # bool("false") is True: never guess
        raise AdapterError(f"{source}: {key} must be true or false, not {_shown(value)}: fix it in {CONFIG_NAME}")
    return value


def _token_indices(value: Any, source: str) -> list[int] | dict[str, list[int]] | None:
    """PEFT trainable tokens: a list of token ids, or module name -> token ids."""

    def ids(items: Any) -> bool:
        return isinstance(items, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in items)

    if value is None or value == [] or value == {}:
        return None
    if ids(value) or (isinstance(value, dict) and all(ids(v) for v in value.values())):
        return value
    raise AdapterError(
        f"{source}: trainable_token_indices must list token ids (or map module names to lists of them), not "
        f"{_shown(value)}: fix it in {CONFIG_NAME}"
    )


@dataclass
class AdapterConfig:
    """The parts of ``adapter_config.json`` that change merge math, each checked (see :func:`parse_config`).

    The LoRA fields are read for ``peft_type`` LORA only; another tuner reads its own keys from ``raw``.
    """

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    lora_bias: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def token_indices(self, module: str, source: str) -> tuple[int, ...]:
        """The token rows PEFT trained in ``module`` (a list applies to the one embedding that has them)."""
        indices = self.trainable_token_indices
        if isinstance(indices, dict):  # module name (or its last parts) -> indices
            keys = [k for k in indices if module == k or module.endswith("." + k)]
            indices = indices[keys[0]] if len(keys) == 1 else None
        if not isinstance(indices, list):
            raise AdapterError(
                f"{source}: {module!r} has trainable tokens but trainable_token_indices in adapter_config.json does "
                "not list its token indices"
            )
        return tuple(indices)

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling for ``module`` with the rank found in its weights."""
        alpha = self.lora_alpha
        pattern = pattern_key(self.alpha_pattern, module)
        if pattern is not None:
            alpha = self.alpha_pattern[pattern]
        return lora_scaling(alpha, rank, self.use_rslora)


def parse_config(data: dict[str, Any], source: str) -> AdapterConfig:
    """An ``adapter_config.json`` object checked and read; :class:`AdapterError` names the first bad key.

    Refuses an unknown ``peft_type``, LoRA options that change the base weights, every value of a wrong type
    (NaN/Inf alphas, ``r`` that is not a positive whole number, flags that are not booleans, bad regular
    expressions, ...).
    """
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", peft_type):
        raise AdapterError(f"{source}: peft_type {_shown(peft_type)} is not a PEFT tuner type: fix {CONFIG_NAME}")
    peft_type = peft_type.upper()
    from .tuners import registered_tuners, tuner_of  # here: the tuners' edits import this module

    if tuner_of(peft_type) is None:
        known = ", ".join(t.peft_type for t in registered_tuners())
        raise AdapterError(
            f"{source}: peft_type {peft_type} is not a PEFT tuner type lorafuse knows ({known}); "
            "merge it with PEFT's merge_and_unload()"
        )
    if peft_type != "LORA":  # the other tuners' keys are read and checked by their own modules (tuners/)
        return AdapterConfig(
            peft_type=peft_type,
            target_modules=_target_modules(data.get("target_modules"), source),
            modules_to_save=_names(data, "modules_to_save", source),
            base_model_name_or_path=_optional_str(data, "base_model_name_or_path", source),
            revision=_optional_str(data, "revision", source),
            trainable_token_indices=_token_indices(data.get("trainable_token_indices"), source),
            fan_in_fan_out=_flag(data, "fan_in_fan_out", source),
            raw=data,
        )
    for flag, reason in UNSUPPORTED_FLAGS.items():
        if data.get(flag) not in (None, False, [], {}, 0):
            raise AdapterError(f"{source}: '{flag}' cannot be merged: {reason}")
    init = data.get("init_lora_weights", True)
    init = init.lower() if isinstance(init, str) else ""  # true/false/"gaussian"/...: the saved A and B are final
    if any(init.startswith(name) for name in UNSUPPORTED_INIT):
        raise AdapterError(
            f"{source}: init_lora_weights={init!r} changes the base weights; save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion to get a plain LoRA, then merge that"
        )
    bias = data.get("bias", "none")
    if bias not in BIAS_VALUES:
        raise AdapterError(f"{source}: bias is {_shown(bias)}: PEFT knows {', '.join(BIAS_VALUES)}; fix {CONFIG_NAME}")
    flags = {key: _flag(data, key, source) for key in BOOL_FLAGS}

    def alpha(value: Any, what: str) -> float:
        return finite_number(value, what, ALPHA_FIX, AdapterError)

    def rank(value: Any, what: str) -> int:
        return positive_int(value, what, RANK_FIX)

    return AdapterConfig(
        peft_type="LORA",
        r=rank(data.get("r", 8), f"{source}: r"),
        lora_alpha=alpha(data.get("lora_alpha", 8), f"{source}: lora_alpha"),
        use_rslora=flags["use_rslora"],
        use_dora=flags["use_dora"],
        fan_in_fan_out=flags["fan_in_fan_out"],
        rank_pattern=_patterns(data, "rank_pattern", source, rank),
        alpha_pattern=_patterns(data, "alpha_pattern", source, alpha),
        target_modules=_target_modules(data.get("target_modules"), source),
        modules_to_save=_names(data, "modules_to_save", source),
        bias=bias,
        lora_bias=flags["lora_bias"],
        base_model_name_or_path=_optional_str(data, "base_model_name_or_path", source),
        revision=_optional_str(data, "revision", source),
        trainable_token_indices=_token_indices(data.get("trainable_token_indices"), source),
        raw=data,
    )


MAX_DEPTH = 32  # PEFT's configs nest 3 levels; deeper is hostile (and would crash later json.dumps or repr)


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (iterative: deep input must not recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def config_object(text: str | bytes, where: str) -> dict[str, Any]:
    """The JSON object an ``adapter_config.json`` holds (``where``: the file or variable, for the message)."""
    try:  # UTF-8, as a file or variable holds it (json.loads would guess UTF-16 or UTF-32 from bytes)
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except ValueError as exc:  # not JSON, not UTF-8, an integer of more than 4300 digits
        raise InputError(f"{where} is not valid JSON ({exc}): give a PEFT {CONFIG_NAME}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to be a PEFT {CONFIG_NAME}: fix or regenerate it") from None
    if not isinstance(data, dict):
        raise InputError(f"{where} must hold a JSON object (a PEFT {CONFIG_NAME})")
    if _depth(data) > MAX_DEPTH:
        raise InputError(f"{where} nests more than {MAX_DEPTH} levels deep, not a PEFT {CONFIG_NAME}: fix it")
    return data


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (an adapter_config.json); :class:`InputError` when it is missing or not one."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path} does not exist: a PEFT adapter folder needs {CONFIG_NAME}") from exc
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror or exc}): check its permissions") from exc
    return config_object(text, str(path))


def load_config(path: Path) -> AdapterConfig:
    """``adapter_config.json`` at ``path``, read and checked (the one reader of both merge paths)."""
    return parse_config(read_config_json(path), str(path))


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first pattern matching the end of ``module`` at a dot boundary, as PEFT matches them."""
    for key in patterns:
        if re.match(_pattern_regex(key), module):
            return key
    return None
