"""Per-part strengths of a diffusion LoRA: the UNet/transformer and each text encoder scaled apart.

ComfyUI's LoRA loader takes ``strength_model`` and ``strength_clip``; kohya's merge scripts take one ratio per
model. lorafuse takes ``--part-weight [N:]PART=W``: PART is ``unet`` (or ``transformer``: the same part), ``te``
(every text encoder), ``te1``, ``te2`` or ``te3``; N (1-based) names one adapter, else every adapter. The part's
updates are scaled by W on top of the adapter's ``--weight`` (``--weight 0.8 --part-weight te=0.5``: UNet 0.8,
text encoders 0.4). A named text encoder beats ``te``, an adapter's own setting beats one for every adapter.

Which part an update belongs to comes from its LoRA name (names/parts.py). A part weight for an adapter whose
names tell no part, or for a part none of the adapters it applies to updates, is refused: it would change nothing,
which is never what was meant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import LorafuseError
from .names.parts import DENOISER, PART_NAMES, TE1, TE2, TE3, TEXT_ENCODERS, adapter_part
from .peft_flags import finite_number

if TYPE_CHECKING:
    from .plan import AdapterInput

FLAG = "--part-weight"
# What users type -> the parts (names/parts.py) it sets, and how specific it is (a named part beats a group).
PART_WORDS: dict[str, tuple[tuple[str, ...], int]] = {
    "unet": ((DENOISER,), 1),
    "transformer": ((DENOISER,), 1),
    "model": ((DENOISER,), 1),
    "te": (TEXT_ENCODERS, 0),
    "clip": (TEXT_ENCODERS, 0),
    "te1": ((TE1,), 1),
    "te2": ((TE2,), 1),
    "te3": ((TE3,), 1),
}
SPEC_RE = re.compile(r"^(?:(?P<index>\d+):)?(?P<part>[A-Za-z]+\d*)=(?P<weight>.+)$")
USAGE = f"give {FLAG} [N:]PART=W, PART one of unet, transformer, te, te1, te2, te3 (e.g. {FLAG} te=0.5)"


@dataclass(frozen=True)
class PartWeight:
    """One ``--part-weight``: ``adapter`` (0-based; None: every adapter), the word typed, its parts, the weight."""

    adapter: int | None
    word: str
    weight: float

    @property
    def typed(self) -> str:
        return f"{'' if self.adapter is None else f'{self.adapter + 1}:'}{self.word}={self.weight:g}"

    @property
    def parts(self) -> tuple[str, ...]:
        return PART_WORDS[self.word][0]

    @property
    def rank(self) -> tuple[int, int]:
        """How specific it is: an adapter's own beats every adapter's, a named part beats a group."""
        return (self.adapter is not None, PART_WORDS[self.word][1])


def parse_part_weight(text: str) -> PartWeight:
    """One ``[N:]PART=W`` as typed; a one-line error naming it otherwise."""
    match = SPEC_RE.match(text.strip())
    if match is None or match["part"].lower() not in PART_WORDS:
        raise LorafuseError(f"{FLAG} {text!r} is not [N:]PART=W: {USAGE}")
    try:
        value = float(match["weight"])
    except ValueError:
        raise LorafuseError(f"{FLAG} {text!r}: {match['weight']!r} is not a number: {USAGE}") from None
    weight = finite_number(value, f"{FLAG} {text!r}", USAGE)
    index = match["index"]
    if index is not None and int(index) < 1:
        raise LorafuseError(f"{FLAG} {text!r}: adapters are numbered from 1: {USAGE}")
    return PartWeight(int(index) - 1 if index is not None else None, match["part"].lower(), weight)


def per_adapter(specs: Sequence[PartWeight], held: Sequence[set[str | None]]) -> list[dict[str, float]]:
    """The settings as one ``part -> factor`` mapping per adapter (parts of names/parts.py), the most specific
    setting of each part winning. ``held``: the parts each adapter updates. A setting that changes no update of
    the adapters it applies to, or one typed twice for the same part, is refused."""
    adapters = len(held)
    result: list[dict[str, float]] = []
    for spec in specs:
        if spec.adapter is not None and spec.adapter >= adapters:
            raise LorafuseError(f"{FLAG} {spec.typed}: there are only {adapters} adapters (numbered from 1)")
        reached = [i for i in range(adapters) if spec.adapter in (None, i) and held[i] & set(spec.parts)]
        if not reached:
            names = " or ".join(PART_NAMES[p] for p in spec.parts)
            whose = f"adapter {spec.adapter + 1}" if spec.adapter is not None else "any adapter"
            raise LorafuseError(
                f"{FLAG} {spec.typed} changes nothing: no update of {whose} belongs to the {names} (the LoRA names "
                "tell the part: lora_unet_, lora_te1_, unet., text_encoder.); drop it or name another part"
            )
    for i in range(adapters):
        chosen: dict[str, tuple[tuple[int, int], float, PartWeight]] = {}
        for spec in specs:
            if spec.adapter not in (None, i):
                continue
            for part in spec.parts:
                before = chosen.get(part)
                if before is not None and before[0] == spec.rank:
                    raise LorafuseError(
                        f"{FLAG} {before[2].typed} and {spec.typed} both set the {PART_NAMES[part]} strength of "
                        f"adapter {i + 1}: give it once"
                    )
                if before is None or before[0] < spec.rank:
                    chosen[part] = (spec.rank, spec.weight, spec)
        result.append({part: weight for part, (_rank, weight, _spec) in chosen.items()})
    return result


def specs_of(value: Sequence[Mapping[str, float] | None] | Sequence[str] | None, adapters: int) -> list[PartWeight]:
    """``merge(part_weights=...)``: ``--part-weight`` strings, or one ``{PART: W}`` mapping per adapter (None or
    empty: none for that adapter), as parsed settings."""
    if value is None:
        return []
    items = list(value)
    if all(isinstance(v, str) for v in items):
        return [parse_part_weight(v) for v in items]  # type: ignore[arg-type]
    if len(items) != adapters or not all(v is None or isinstance(v, Mapping) for v in items):
        raise LorafuseError(
            f"part_weights holds {len(items)} entries for {adapters} adapters: give one {{PART: W}} mapping per "
            f"adapter (None for none), or {FLAG} strings"
        )
    return [
        PartWeight(i, *_word_and_weight(word, weight))
        for i, m in enumerate(items)
        for word, weight in (m or {}).items()
    ]


def _word_and_weight(word: object, weight: object) -> tuple[str, float]:
    if not isinstance(word, str) or word.lower() not in PART_WORDS:
        raise LorafuseError(f"part_weights names the part {word!r}: {USAGE}")
    return word.lower(), finite_number(weight, f"part_weights[{word!r}]", USAGE)


def parts_updated(sources: Iterable[str]) -> set[str | None]:
    """The parts the updates named ``sources`` (LoRA names) belong to (None: a name that tells none)."""
    return {adapter_part(s) for s in sources}


def factor(weights: Mapping[str, float], label: str, source: str) -> float:
    """The factor of the update named ``source`` (its LoRA name) of adapter ``label`` under ``weights``: 1 where
    no part weight applies; an error when part weights are set but the name tells no part."""
    if not weights:
        return 1.0
    part = adapter_part(source)
    if part is None:
        raise LorafuseError(
            f"{label}: {FLAG} is set but its update {source!r} names no part (UNet/transformer, text encoder): "
            f"part strengths apply to diffusion LoRAs whose names tell the part (lora_unet_, lora_te1_, unet., "
            f"text_encoder.); use --weight for this adapter"
        )
    return weights.get(part, 1.0)


def set_part_weights(inputs: Sequence[AdapterInput], specs: Sequence[PartWeight]) -> None:
    """Give each read adapter its part factors from ``specs`` (checked against the parts its updates belong to)."""
    if not specs:
        return
    held = [parts_updated(t.edit.source_key or t.target for t in inp.edits) for inp in inputs]
    for inp, weights in zip(inputs, per_adapter(specs, held)):
        inp.part_weights = weights


def recorded(weights: Mapping[str, float]) -> dict[str, float]:
    """The part weights as the report and provenance record them (part names users type: unet, te1...)."""
    words = {DENOISER: "unet", TE1: "te1", TE2: "te2", TE3: "te3"}
    return {words[p]: w for p, w in sorted(weights.items(), key=lambda kv: list(words).index(kv[0]))}
