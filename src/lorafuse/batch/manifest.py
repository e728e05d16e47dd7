"""A batch manifest: jobs of the ``lorafuse`` commands with the commands' own options, and shared defaults.

```yaml
defaults:              # every job whose command has the option
  dtype: bf16
  merge:               # the jobs of one command only
    max_shard_size: 2GB
jobs:
  - command: merge
    id: sweep-0.5      # optional: default "<command>-<n>"
    base: models/base
    adapters: [runs/a]
    weight: [0.5]
    output: out/a-0.5
  - {command: verify, merged: out/a-0.5, base: models/base, adapter: [runs/a], weight: [0.5]}
```

Keys are the commands' own option names (``max_shard_size`` or ``max-shard-size``, positionals by their names:
``base``/``adapters`` for merge, ``base``/``tuned`` for extract). Each job becomes the argument list of its command
and is parsed by that command's own parser (cli/), so a manifest accepts exactly what the command line does and
a job runs exactly as the command would. Relative paths are relative to the manifest's folder. JSON needs nothing;
YAML needs PyYAML.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

COMMANDS = ("merge", "extract", "verify", "combine", "convert")
JOB_KEYS = ("command", "id")  # a job's own keys; every other key is an option of its command
OPTIONS_ALWAYS_ADDED = ("json", "quiet", "verbose")  # the batch sets these itself


@dataclass(frozen=True)
class Job:
    """One job: its id, command, the command's argument list, and the folder its relative paths start from."""

    id: str
    command: str
    argv: tuple[str, ...]
    cwd: str
    output: str | None  # the output path the command writes (None: verify), relative to ``cwd``
    inputs: tuple[str, ...]  # the positionals (models, adapters) that a base sharing or a resume looks at

    @property
    def base(self) -> str | None:
        """The first input: the base model of merge, extract and verify (jobs of one base run side by side)."""
        return self.inputs[0] if self.inputs else None


def read_manifest_file(path: Path) -> Any:
    """The manifest's data: JSON, or YAML (``.yaml``/``.yml``, with PyYAML)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read the manifest {path}: {exc.strerror or exc}") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(
                f"{path} is YAML, which needs PyYAML: pip install pyyaml, or write the manifest as JSON"
            ) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from ..cli import build_parser

    root = build_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in COMMANDS if name in sub.choices}


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option and positional of ``parser`` under each name a manifest may give it (dest and long flags)."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", *OPTIONS_ALWAYS_ADDED) or isinstance(action, argparse._VersionAction):
            continue
        found.setdefault(action.dest, action)
        for flag in action.option_strings:
            if flag.startswith("--"):
                found.setdefault(flag[2:].replace("-", "_"), action)
    return found


def _values(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def job_argv(parser: argparse.ArgumentParser, options: dict[str, Any], where: str) -> tuple[list[str], list[str]]:
    """``options`` as the command's arguments: (argv, positionals in order). Unknown keys are one-line errors."""
    actions = _actions_by_key(parser)
    flags: list[str] = []
    positionals: dict[str, list[str]] = {}
    for key, value in options.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            known = ", ".join(sorted(k for k in actions if k == actions[k].dest))
            raise InputError(f"{where}: {parser.prog} has no option {key!r}; its options are {known}")
        if value is None:
            continue
        if not action.option_strings:
            positionals[action.dest] = _values(value)
            continue
        flag = next((f for f in action.option_strings if f.startswith("--")), action.option_strings[0])
        if action.nargs == 0:  # a switch: true gives it, false leaves it out
            if not isinstance(value, bool):
                raise InputError(f"{where}: {key} is a switch: give true or false, not {value!r}")
            flags += [flag] if value else []
            continue
        flags += [f"{flag}={v}" for v in _values(value)]
    ordered = [v for action in parser._actions if not action.option_strings for v in positionals.get(action.dest, [])]
    return [*flags, "--", *ordered] if ordered else flags, ordered


def _defaults_for(defaults: dict[str, Any], command: str, keys: set[str]) -> dict[str, Any]:
    """The shared defaults a job of ``command`` takes: general ones its parser knows, then its command's own."""
    shared = {k: v for k, v in defaults.items() if k not in COMMANDS and k.replace("-", "_") in keys}
    own = defaults.get(command) or {}
    if not isinstance(own, dict):
        raise InputError(f"defaults.{command} must be a mapping of {command} options")
    return shared | own


def load_manifest(path: str | Path) -> list[Job]:
    """The jobs of the manifest at ``path``, each checked by its command's own parser (one-line errors)."""
    path = Path(path)
    data = read_manifest_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise InputError(f"{path}: a manifest is a mapping with a non-empty list under 'jobs'")
    defaults = data.get("defaults") or {}
    unknown = set(data) - {"jobs", "defaults"}
    if not isinstance(defaults, dict) or unknown:
        raise InputError(f"{path}: a manifest holds 'jobs' and 'defaults' (a mapping), not {sorted(unknown)}")
    parsers = _parsers()
    cwd = str(path.absolute().parent)
    jobs: list[Job] = []
    for n, entry in enumerate(data["jobs"], 1):
        where = f"{path}: job {n}"
        if not isinstance(entry, dict) or entry.get("command") not in parsers:
            raise InputError(f"{where}: give 'command', one of {', '.join(parsers)}")
        command = entry["command"]
        job_id = str(entry.get("id") or f"{command}-{n}")
        parser = parsers[command]
        options = _defaults_for(defaults, command, set(_actions_by_key(parser))) | {
            k: v for k, v in entry.items() if k not in JOB_KEYS
        }
        argv, positionals = job_argv(parser, options, f"{where} ({job_id})")
        args = _parse(parser, argv, f"{where} ({job_id})")
        jobs.append(Job(job_id, command, tuple(argv), cwd, getattr(args, "output", None), tuple(positionals)))
    seen: set[str] = set()
    for job in jobs:
        if job.id in seen:
            raise InputError(f"{path}: two jobs have the id {job.id!r}: ids name each job's line in the report")
        seen.add(job.id)
    outputs = [str(Path(job.cwd) / job.output) for job in jobs if job.output]
    twice = next((o for o in outputs if outputs.count(o) > 1), None)
    if twice is not None:
        raise InputError(f"{path}: two jobs write {twice}: give each job its own output")
    return jobs


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    """Parse as the command line would; argparse's error becomes one line naming the job."""
    from ..cli.weight_flag import weights_apart

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return parser.parse_args(weights_apart(argv))
    except SystemExit:
        line = said.getvalue().strip().splitlines()[-1] if said.getvalue().strip() else "bad options"
        raise InputError(f"{where}: {line.split(': error: ', 1)[-1]}") from None
