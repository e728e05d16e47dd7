"""Names the plan, extract and combine agree on: embeddings and the output head, and configured target modules
that matched no LoRA weights (a warning)."""

from __future__ import annotations

import re
from typing import Any

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


def unmatched_targets(label: str, targets: Any, modules: list[str]) -> list[str]:
    """Warnings for the adapter config's ``target_modules`` that none of ``modules`` (those with LoRA weights) is."""
    if not targets or not modules:
        return []
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, m) for m in modules):
            return []
        return [f"{label}: target_modules {targets!r} matched no module with LoRA weights"]
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    return [f"{label}: target module {t!r} in its config matched no LoRA weights" for t in missing]
