"""The parts of a diffusion model (the UNet or transformer, each text encoder) that a LoRA's names and a base
checkpoint's names belong to, so that no LoRA module lands on another part's tensors (kohya ``lora_te2_*`` on the
first text encoder) and no part is dropped silently (:class:`PartTally`, which the plan feeds).

A LoRA name tells its part by its prefix (kohya ``lora_unet_``/``lora_te2_``, diffusers ``unet.``/``text_encoder_2.``).
A base name tells it by its leading components (``text_encoder_2.``, ``conditioner.embedders.1.``,
``model.diffusion_model.``); a model folder of one component carries none, and is then told by the names it holds
(a text encoder's token embedding, a UNet's down blocks). A name of neither kind belongs to no part: generic
adapters and models are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import AdapterError

DENOISER = "unet"  # the UNet or transformer, whichever the model has
TE1, TE2, TE3 = "te1", "te2", "te3"
TEXT_ENCODERS = (TE1, TE2, TE3)
VAE = "vae"
# What the report and messages call each part.
PART_NAMES = {
    DENOISER: "UNet/transformer",
    TE1: "text encoder 1",
    TE2: "text encoder 2",
    TE3: "text encoder 3",
    VAE: "VAE",
}

# kohya / LyCORIS prefix (the part of ``lora_<part>_...``) -> part.
KOHYA_PARTS = {
    "unet": DENOISER,
    "transformer": DENOISER,
    "te": TE1,
    "te1": TE1,
    "te2": TE2,
    "te3": TE3,
}
KOHYA_RE = re.compile(r"^(?:lora_(?P<part>[A-Za-z]+\d*)_|lycoris_)")
# Leading dotted components -> part, for LoRA names (diffusers) and base names (diffusers pipelines, original
# single-file checkpoints). Longest first where one is a prefix of another.
DOTTED_PARTS = (
    ("model.diffusion_model.", DENOISER),
    ("diffusion_model.", DENOISER),
    ("unet.", DENOISER),
    ("transformer.", DENOISER),
    ("text_encoder_2.", TE2),
    ("text_encoder_3.", TE3),
    ("text_encoder.", TE1),
    ("cond_stage_model.", TE1),
    ("conditioner.embedders.0.", TE1),
    ("conditioner.embedders.1.", TE2),
    ("first_stage_model.", VAE),
    ("vae.", VAE),
)
# Names that tell what a checkpoint of one component without part prefixes is: CLIP's own module names (a T5 or
# an LLM used as a text encoder looks like any language model, and is left untold).
TEXT_ENCODER_MARKS = ("token_embedding.", "text_model.", "text_projection.")
DENOISER_MARKS = (
    "down_blocks.",
    "time_embedding.",
    "time_embed.",
    "transformer_blocks.",
    "double_blocks.",
    "single_blocks.",
    "input_blocks.",
    "patch_embedding.",
    "time_text_embed.",
)


def adapter_part(name: str) -> str | None:
    """The part a LoRA tensor name targets (kohya or diffusers prefixes); None when the name tells none."""
    match = KOHYA_RE.match(name)
    if match:
        return KOHYA_PARTS.get(match["part"]) if match["part"] else DENOISER
    return _dotted_part(name)


def base_part(name: str) -> str | None:
    """The part a base tensor name belongs to by its leading components; None when they tell none."""
    return _dotted_part(name)


def _dotted_part(name: str) -> str | None:
    return next((part for prefix, part in DOTTED_PARTS if name.startswith(prefix)), None)


def unprefixed_part(base_keys: Iterable[str]) -> str | None:
    """What the base's tensors without a part prefix are: a CLIP text encoder (``te1``, the one component), the
    UNet/transformer, or None (a model that is neither, or a mix, or that its names do not tell)."""
    keys = [k for k in base_keys if base_part(k) is None]
    text = any(mark in k for k in keys for mark in TEXT_ENCODER_MARKS)
    denoiser = any(k.startswith(DENOISER_MARKS) for k in keys)
    if text == denoiser:
        return None
    return TE1 if text else DENOISER


def may_land(lora: str | None, base: str | None) -> bool:
    """Whether a LoRA name of part ``lora`` may resolve onto a base name of part ``base``: the same part, or an
    unnamed one for the parts a one-component folder can be told by (the UNet, the only or first text encoder).
    Text encoders 2 and 3 land only where the base names them: a lone text encoder may be either."""
    if lora is None or lora == base:
        return True
    return base is None and lora in (DENOISER, TE1)


@dataclass
class PartTally:
    """Per part, the LoRA modules of one adapter that merged and those the base had no tensor for.

    ``held``: the parts the base holds. :meth:`placed` refuses a module that resolved onto another part's tensor;
    :meth:`check` refuses a part the base holds whose modules matched nothing (a name layout the maps missed), even
    where unmatched updates may be skipped.
    """

    label: str
    held: set[str]
    unprefixed: str | None
    text_encoders: set[str] = field(default_factory=set)  # the adapter's text-encoder parts
    merged: dict[str, set[str]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # part -> module -> its first tensor

    @classmethod
    def of_base(cls, label: str, base_keys: Iterable[str], sources: Iterable[str]) -> PartTally:
        """The tally of adapter ``label`` (LoRA tensor names ``sources``) against a base of ``base_keys``."""
        keys = list(base_keys)
        unprefixed = unprefixed_part(keys)
        held = {part for part in map(base_part, keys) if part is not None}
        if unprefixed is not None and any(base_part(k) is None for k in keys):
            held.add(unprefixed)
        text_encoders = {p for p in map(adapter_part, sources) if p in TEXT_ENCODERS}
        return cls(label, held, unprefixed, text_encoders)

    def placed(self, source: str, target: str, key: str) -> None:
        """Record LoRA tensor ``source`` (for ``target``) merged into base tensor ``key``; refuse another part's."""
        part = adapter_part(source)
        if part is None:
            return
        landed = base_part(key)
        fix = f"merge into a checkpoint or folder that names the {PART_NAMES[part]}"
        if not may_land(part, landed) or (landed is None and self.unprefixed not in (None, part)):
            where = PART_NAMES.get(landed or self.unprefixed or "", "another part")
            raise AdapterError(
                f"{self.label}: {source!r} is a {PART_NAMES[part]} LoRA but resolves onto {key!r} of the base's "
                f"{where}: {fix}"
            )
        if landed is None and part == TE1 and len(self.text_encoders) > 1:
            raise AdapterError(
                f"{self.label}: {source!r} resolves onto {key!r} of a text encoder whose names do not tell which of "
                f"the LoRA's {len(self.text_encoders)} text encoders it is: {fix}"
            )
        self.merged.setdefault(part, set()).add(target.rpartition(".")[0] or target)

    def missed(self, source: str, target: str) -> None:
        """Record LoRA tensor ``source`` (for ``target``), which matched no base tensor (skipped with
        --allow-unmatched)."""
        part = adapter_part(source)
        if part is not None:
            self.skipped.setdefault(part, {}).setdefault(target.rpartition(".")[0] or target, source)

    def check(self) -> list[str]:
        """Refuse a part the base holds that none of its modules reached; the warnings for skipped parts."""
        warnings = []
        for part, modules in self.skipped.items():
            name, first = PART_NAMES[part], next(iter(modules.values()))
            if part in self.held and part not in self.merged:
                raise AdapterError(
                    f"{self.label}: none of its {len(modules)} {name} LoRA modules matches a tensor of the base, which "
                    f"holds the {name} (first: {first!r}): their names are in a layout lorafuse does not map onto "
                    "this checkpoint; --allow-unmatched does not skip a whole part the base holds"
                )
            if part not in self.held:
                warnings.append(
                    f"{self.label}: its {name} part ({len(modules)} modules) was skipped: the base holds no {name}"
                )
        return warnings

    def summary(self) -> dict[str, dict[str, int]]:
        """Per part: LoRA modules merged, and skipped."""
        parts = sorted(set(self.merged) | set(self.skipped), key=list(PART_NAMES).index)
        return {
            PART_NAMES[p]: {"merged": len(self.merged.get(p, ())), "skipped": len(self.skipped.get(p, ()))}
            for p in parts
        }
