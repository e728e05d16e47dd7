"""adapter_config.json settings lorafuse refuses (no torch here: the CLI's fast path checks them too)."""

from __future__ import annotations

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
