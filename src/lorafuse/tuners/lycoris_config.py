"""The keys PEFT's LoHa and LoKr configs share (``LycorisConfig``): ``r``, ``alpha``, ``rank_pattern`` and
``alpha_pattern``, read from ``adapter_config.json`` and checked, and each module's rank and scale from them.

PEFT scales a LyCORIS update by ``alpha / r``, both taken per module from the patterns (first matching key, as
PEFT's ``get_pattern_key`` matches them) or else from ``r`` / ``alpha``. Where the saved tensors show the rank
(a low-rank pair, a Tucker core) the readers check it against the config's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import AdapterError
from ..peft_flags import CONFIG_NAME, _patterns, finite_number, pattern_key, positive_int

ALPHA_FIX = "set it to the alpha the adapter was trained with"
RANK_FIX = "set it to the rank the adapter was trained with"


@dataclass(frozen=True)
class LycorisSettings:
    """``r``, ``alpha`` and their per-module patterns, checked."""

    r: int
    alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def scale(self, module: str) -> float:
        """PEFT's ``alpha / r`` for ``module``."""
        key = pattern_key(self.alpha_pattern, module)
        alpha = self.alpha if key is None else self.alpha_pattern[key]
        return alpha / self.rank(module)


def _alpha(value: Any, what: str) -> float:
    return finite_number(value, what, ALPHA_FIX, AdapterError)


def _rank(value: Any, what: str) -> int:
    return positive_int(value, what, RANK_FIX)


def lycoris_settings(raw: dict[str, Any], source: str) -> LycorisSettings:
    """The checked ``r``/``alpha``/patterns of a LoHa or LoKr ``adapter_config.json`` (PEFT's defaults: 8, 8)."""
    return LycorisSettings(
        r=_rank(raw.get("r", 8), f"{source}: r"),
        alpha=_alpha(raw.get("alpha", 8), f"{source}: alpha"),
        rank_pattern=_patterns(raw, "rank_pattern", source, _rank),
        alpha_pattern=_patterns(raw, "alpha_pattern", source, _alpha),
    )


def rank_error(module: str, what: str, found: int, expected: int, source: str) -> AdapterError:
    """The saved tensors' rank disagrees with the config's (the scale alpha/r would be wrong)."""
    return AdapterError(
        f"{source}: module {module!r}: {what} has rank {found} but {CONFIG_NAME} gives r={expected} for it "
        "(r / rank_pattern): fix the config to the rank the adapter was trained with"
    )
