"""``--weight``: each adapter's strength, the same flag in every command that takes several adapters.

Given once per adapter (``--weight 0.5 --weight 1``) or as several values after one flag (``--weight 0.5 1``),
or mixed; the values add up in order. Older spellings (combine's ``--weights``) are aliases of the same flag.

A flag that takes several values would swallow the positionals after it (``--weight 0.5 BASE ADAPTER``), so
:func:`weights_apart` rewrites the number-like values after it as ``--weight=V`` each before parsing: the values
that read as numbers are weights, the first one that does not ends the list.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..peft_flags import strengths

WEIGHT_SPELLINGS = ("--weight", "--weights")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def weights_apart(argv: Sequence[str]) -> list[str]:
    """``argv`` with each number-like value after a ``--weight`` spelling given as ``--weight=V``, so that the
    flag never takes a positional (a path) as one of its values; ``--`` ends the rewriting. A spelling with no
    number after it is kept as typed, for argparse's own error."""
    out: list[str] = []
    flag: str | None = None
    taken = 0  # values rewritten for the current flag
    for i, arg in enumerate(argv):
        if flag is not None and _is_number(arg):
            out.append(f"{flag}={arg}")
            taken += 1
            continue
        if flag is not None and not taken:
            out.append(flag)
        if arg == "--":
            return out + list(argv[i:])
        flag, taken = (arg if arg in WEIGHT_SPELLINGS else None), 0
        if flag is None:
            out.append(arg)
    if flag is not None and not taken:
        out.append(flag)
    return out


class WeightAction(argparse.Action):
    """Appends every value given after the flag, and remembers the spelling typed (for error messages)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, [*given, *(values or [])])
        setattr(namespace, f"{self.dest}_flag", option_string or self.option_strings[0])


def add_weight_flag(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """Add ``--weight`` (and ``aliases``) to ``parser``; the values land in ``args.weight`` (None when not given)."""
    parser.add_argument(
        "--weight",
        *aliases,
        dest="weight",
        type=float,
        nargs="+",
        action=WeightAction,
        metavar="W",
        help="strength of each adapter, in the adapters' order: once per adapter (--weight 0.5 --weight 1) or "
        "several values after one flag (--weight 0.5 1); default 1 each",
    )


def given_weights(args: argparse.Namespace) -> list[float] | None:
    """The strengths given on the command line, each checked to be finite (errors name the spelling typed)."""
    if args.weight is None:
        return None
    return strengths(args.weight, getattr(args, "weight_flag", "--weight"))


def add_part_weight_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--part-weight [N:]PART=W`` (repeatable; part_weights.py); the values land in ``args.part_weight``."""
    parser.add_argument(
        "--part-weight",
        dest="part_weight",
        action="append",
        metavar="[N:]PART=W",
        help="strength of one part of a diffusion LoRA, times its --weight: PART unet (= transformer), te (every text "
        "encoder), te1, te2, te3; N (from 1) names one adapter, else every adapter (ComfyUI's strength_model / "
        "strength_clip: --part-weight te=0.5); repeatable",
    )
