"""docs/tuners.md's table of PEFT tuner types x layer types, generated from the registry.

A tuner module lists the layer kinds it merges in ``Tuner.extra["layers"]`` (peft_layer.LAYER_KINDS); a tuner
that lists none shows "not listed" there. ``python -m lorafuse.tuners.table`` rewrites the table in the docs
(between its two markers); tests/test_tuners_others.py checks that the docs hold what this module generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import registered_tuners
from .peft_layer import LAYER_KINDS
from .registry import Tuner

BEGIN, END = "<!-- tuner table: begin -->", "<!-- tuner table: end -->"
COLUMNS = {
    "linear": "Linear",
    "conv1d": "Conv1d",
    "conv2d": "Conv2d",
    "conv3d": "Conv3d",
    "embedding": "Embedding",
    "gpt2_conv1d": "GPT-2 Conv1D",
    "parameter": "parameters",
    "any": "any module",
}
HOW = {"native": "native", "peft": "through PEFT", "refused": "refused"}
assert tuple(COLUMNS) == LAYER_KINDS, "one column per layer kind"


def _row(tuner: Tuner) -> str:
    how = HOW.get(tuner.how, tuner.how)
    layers = tuner.extra.get("layers")
    if tuner.how == "refused":
        cells = ["-"] * len(COLUMNS)
        what = f"refused: {tuner.description}"
    elif layers is None:
        cells = ["not listed"] * len(COLUMNS)
        what = tuner.description
    else:
        cells = [how if kind in layers else "-" for kind in COLUMNS]
        what = tuner.description + ("; changes the bias too" if tuner.extra.get("bias") else "")
    return f"| {tuner.peft_type} | {how} | " + " | ".join(cells) + f" | {what} |"


def tuner_table() -> str:
    """The markdown table of every registered tuner type, by name."""
    head = "| tuner | merged | " + " | ".join(COLUMNS.values()) + " | what / why |"
    rule = "|" + "---|" * (len(COLUMNS) + 3)
    rows = [_row(t) for t in sorted(registered_tuners(), key=lambda t: t.peft_type)]
    return "\n".join([head, rule, *rows])


def rewrite(path: Path) -> None:
    """Replace the table between the markers in ``path`` with the generated one."""
    text = path.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + tuner_table() + "\n" + text[stop:])


if __name__ == "__main__":
    rewrite(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/tuners.md"))
