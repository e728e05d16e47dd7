"""Match the tensor names an adapter uses onto the names a base checkpoint uses.

Adapters name tensors as in the model class they were trained on (``model.layers.0...``) while a base
checkpoint may carry a different head prefix (``bert.encoder...`` vs ``encoder...``). A name matches when it
is equal, or when one is the other with leading dotted components removed, and the match is unique.
"""

from __future__ import annotations

from collections import defaultdict


class PrefixMap:
    """Resolves adapter target names against a fixed set of base tensor names, across head-prefix differences."""

    def __init__(self, base_keys: list[str]):
        self.keys = set(base_keys)
        self._by_suffix: dict[str, list[str]] = defaultdict(list)
        for key in base_keys:
            parts = key.split(".")
            for i in range(1, len(parts)):
                self._by_suffix[".".join(parts[i:])].append(key)

    def resolve(self, target: str) -> str | None:
        """The base name for ``target``, or None when there is none or more than one candidate."""
        if target in self.keys:
            return target
        # The base has extra leading components (base "bert.encoder.x", adapter "encoder.x").
        candidates = self._by_suffix.get(target, [])
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            return None
        # The adapter has extra leading components (adapter "bert.encoder.x", base "encoder.x").
        parts = target.split(".")
        for i in range(1, len(parts) - 1):
            tail = ".".join(parts[i:])
            if tail in self.keys:
                return tail
        return None

    def ambiguous(self, target: str) -> list[str]:
        """Every candidate when ``target`` matches more than one base name."""
        candidates = self._by_suffix.get(target, [])
        return candidates if len(candidates) > 1 else []
