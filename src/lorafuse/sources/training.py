"""A trainer's output folder given as an adapter: which adapter in it the user means.

What transformers.Trainer (with a PEFT model) writes into ``output_dir``: a ``checkpoint-<step>/`` folder at every
save (the adapter's ``adapter_config.json`` + ``adapter_model.safetensors``, the tokenizer when the trainer was given
one, and optimizer/scheduler/RNG states, ``trainer_state.json``), oldest ones deleted past ``save_total_limit``; and,
when the script calls ``trainer.save_model()`` at the end, the final adapter at the top level (the best checkpoint's
weights with ``load_best_model_at_end``). So:

- an adapter at the top level is the trained result: it is merged as any adapter folder is (the checkpoints
  beside it are mentioned, not used);
- otherwise the checkpoint with the highest step number (``checkpoint-1000`` after ``checkpoint-900``, whatever the
  name order) is merged, and the note says so (and names the best checkpoint when trainer_state.json records
  another one).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from ..io.model_files import real_path
from .adapter_config import CONFIG_NAME, PEFT_WEIGHT_NAMES

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainingChoice:
    """The adapter chosen inside a training output folder, and the note that tells the user."""

    path: Path
    checkpoint: str | None  # the checkpoint folder's name; None when the top-level adapter is used
    note: str


def _holds_adapter(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and any((folder / name).is_file() for name in PEFT_WEIGHT_NAMES)


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-<step>`` sub-folders of ``folder`` by step (a tie such as checkpoint-100 and checkpoint-0100
    is refused: which one is meant is not known; so is an entry of that name that is no folder inside ``folder``)."""
    found: dict[int, Path] = {}
    for entry in folder.iterdir():
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match is None:
            continue
        # A broken, looping or outward link is refused (skipping it would merge an older checkpoint in silence).
        if not real_path(entry, folder).is_dir():
            raise SourceError(f"{entry} is not a folder: a trainer's checkpoint is one; remove it or pass the adapter")
        step = int(match.group(1))
        if step in found:
            raise SourceError(
                f"{folder} holds {found[step].name} and {entry.name}, both step {step}: pass the checkpoint folder "
                "to merge"
            )
        found[step] = entry
    return sorted(found.items())


def _best_checkpoint(state_file: Path) -> str | None:
    """The ``best_model_checkpoint`` folder name trainer_state.json records, if it records one."""
    try:
        best = json.loads(state_file.read_text()).get("best_model_checkpoint")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return Path(best).name if isinstance(best, str) and best else None


def training_choice(folder: Path) -> TrainingChoice | None:
    """The adapter meant by ``folder`` when it is a trainer's output folder (it holds ``checkpoint-<step>/``
    sub-folders); None when it is not one (it is read as the adapter folder it is)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    checkpoints = _checkpoints(folder)
    if not checkpoints:
        return None
    names = ", ".join(path.name for _, path in checkpoints)
    if _holds_adapter(folder):
        return TrainingChoice(
            folder,
            None,
            f"{folder} is a training output folder with an adapter at its top level (the final one the trainer "
            f"saved): taking that one, not its checkpoints ({names}); pass {checkpoints[-1][1]} for the latest",
        )
    step, latest = checkpoints[-1]
    if not _holds_adapter(latest):
        raise SourceError(
            f"{latest}, the latest checkpoint in the training output {folder}, holds no adapter ({CONFIG_NAME} and "
            "adapter_model.safetensors): pass the checkpoint folder of the adapter to merge"
        )
    note = f"{folder} is a training output folder: taking its latest checkpoint, {latest.name} (step {step}"
    note += f"; it holds {names})" if len(checkpoints) > 1 else ")"
    best = _best_checkpoint(latest / TRAINER_STATE)
    if best is not None and best != latest.name:
        note += f"; trainer_state.json names {best} as the best: pass {folder / best} to merge that one"
    return TrainingChoice(latest, latest.name, note)
