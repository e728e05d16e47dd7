"""PEFT tuner types, one module each, registered in :mod:`.registry` (see there). Importing this package registers
the built-in ones."""

from __future__ import annotations

from . import (  # noqa: F401
    adalora,
    beft,
    boft,
    fourierft,
    hra,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    miss,
    oft,
    refused,
    shira,
    through_peft,
    trainable_tokens,
    vera,
)
from .registry import Tuner, TunerInput, group_tensors, register_tuner, registered_tuners, tuner_of

__all__ = ["Tuner", "TunerInput", "group_tensors", "register_tuner", "registered_tuners", "tuner_of"]
