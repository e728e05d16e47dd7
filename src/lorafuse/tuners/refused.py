"""PEFT tuner types with nothing lorafuse can merge: each is registered with the reason, so that such an adapter
is refused with one line naming its tuner and why, instead of "unknown tuner"."""

from __future__ import annotations

from ..edits import TargetedEdit
from ..errors import AdapterError
from .registry import Tuner, TunerInput, register_tuner

PROMPT = "a prompt-learning method: it trains virtual-token embeddings fed beside the input, not weights"
# peft_type -> why it cannot be merged
REFUSED: dict[str, str] = {
    "PROMPT_TUNING": PROMPT,
    "MULTITASK_PROMPT_TUNING": PROMPT,
    "P_TUNING": PROMPT + " (through a prompt encoder)",
    "PREFIX_TUNING": "a prompt-learning method: it trains key/value prefixes for every attention layer, not weights",
    "CPT": PROMPT + " (context-aware prompt tuning)",
    "CARTRIDGE": "a prompt-learning method: it trains a key/value cache fed beside the input, not weights",
    "ADAPTION_PROMPT": "it adds gated prompt attention to layers, a new computation rather than a weight update",
    "XLORA": "it mixes LoRA experts per token with a learned classifier, an input-dependent update",
    "POLY": "it routes each task among LoRA skills with a learned router, a per-task update",
    "LILY": "its layers share low-rank experts through an input-dependent router (PEFT's Lily layer has no merge)",
    "SHADOW": "its shadow network follows the data through the layers, an input-dependent update",
}


def _refuse(tuner_input: TunerInput) -> tuple[list[TargetedEdit], dict[str, int]]:
    peft_type = tuner_input.config.peft_type
    raise AdapterError(
        f"{tuner_input.source}: {peft_type} adapters cannot be merged: {REFUSED[peft_type]}; there is nothing to "
        "merge into the weights (nor can PEFT)"
    )


TUNERS = [register_tuner(Tuner(t, (), _refuse, how="refused", description=why)) for t, why in REFUSED.items()]
