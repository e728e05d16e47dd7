"""adapter_config.json settings lorafuse refuses, and PEFT's LoRA scaling (no torch here: the CLI's fast path
uses them too)."""

from __future__ import annotations

import math


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale of ``B @ A``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


UNSUPPORTED_INIT = ("pissa", "olora", "corda", "loftq")
UNSUPPORTED_FLAGS = (
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "target_parameters",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "alora_invocation_tokens",
)
