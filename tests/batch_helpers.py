"""Shared by the batch and shard-merge tests: a small manifest of tiny models, the same commands run one by one, and
byte comparisons of the outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

from helpers import make_peft_adapter

from lorafuse.cli import main
from lorafuse.io.output import MARKER

# Vary between two runs of the same command: its time, the folder it ran in, a shard-parallel merge's shard hashes.
RUN_FIELDS = ("seconds", "cwd", "shard_sha256")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, root: Path) -> dict[str, Path]:
    """Two PEFT adapters of ``base`` and one whose adapter_config.json is broken."""
    good = {
        "a": make_peft_adapter(base, root / "a", target_modules=ALL_LINEAR, seed=1),
        "b": make_peft_adapter(base, root / "b", target_modules=["q_proj", "v_proj"], seed=2, r=2),
    }
    bad = root / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    return {**good, "bad": bad}


def manifest_jobs(base: Path, adapters: dict[str, Path], out: str) -> list[dict]:
    """Merges, an extract and verifies of the tiny models, writing under the folder ``out``."""
    return [
        {"command": "merge", "id": "m-a", "base": str(base), "adapters": [str(adapters["a"])], "output": f"{out}/m-a"},
        {
            "command": "merge",
            "id": "m-ab",
            "base": str(base),
            "adapters": [str(adapters["a"]), str(adapters["b"])],
            "weight": [0.5, 1.5],
            "dtype": "bf16",
            "output": f"{out}/m-ab",
        },
        {
            "command": "extract",
            "id": "x-a",
            "base": str(base),
            "tuned": f"{out}/m-a",
            "rank": 4,
            "output": f"{out}/x-a",
        },
        {
            "command": "verify",
            "id": "v-ab",
            "merged": f"{out}/m-ab",
            "base": str(base),
            "adapter": [str(adapters["a"]), str(adapters["b"])],
            "weight": [0.5, 1.5],
            "no_output_check": True,
        },
    ]


def write_manifest(folder: Path, jobs: list[dict], defaults: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jobs.json"
    path.write_text(json.dumps({"defaults": defaults or {"merge": {"max_shard_size": "60KB"}}, "jobs": jobs}))
    return path


def run_one_by_one(folder: Path, argvs: list[list[str]]) -> None:
    """The commands as a user runs them, in ``folder`` (where the manifest's relative paths start)."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        for argv in argvs:
            assert main(["-q", *argv]) == 0, argv
    finally:
        os.chdir(here)


# manifest_jobs' merges and extract as commands ({base}, {a}, {b}: the model and make_adapters' adapters).
SEQUENTIAL = [
    ["merge", "{base}", "{a}", "-o", "out/m-a", "--max-shard-size", "60KB"],
    ["merge", "{base}", "{a}", "{b}", "--weight", "0.5", "1.5", "--dtype", "bf16", "-o", "out/m-ab",
     "--max-shard-size", "60KB"],
    ["extract", "{base}", "out/m-a", "--rank", "4", "-o", "out/x-a"],
]  # fmt: skip


def run_sequential(base: Path, adapters: dict[str, Path], folder: Path) -> Path:
    """:data:`SEQUENTIAL` run one by one in ``folder``: the bytes every executor must give; returns ``folder/out``."""
    names = {"base": str(base), **{k: str(v) for k, v in adapters.items()}}
    run_one_by_one(folder, [[arg.format(**names) for arg in argv] for argv in SEQUENTIAL])
    return folder / "out"


def same_tree(got: Path, want: Path, also: tuple[str, ...] = ()) -> None:
    """Every file of ``want`` is in ``got`` with the same bytes; the provenance files equal but for RUN_FIELDS and
    the fields ``also``."""
    names = sorted(str(p.relative_to(want)) for p in want.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert names
    for name in names:
        a, b = (got / name).read_bytes(), (want / name).read_bytes()
        if Path(name).name.startswith("lorafuse_") and name.endswith(".json"):
            a_rec, b_rec = json.loads(a), json.loads(b)
            for key in (*RUN_FIELDS, *also):
                a_rec.pop(key, None), b_rec.pop(key, None)
            assert a_rec == b_rec, {
                k: (a_rec.get(k), b_rec.get(k)) for k in {*a_rec, *b_rec} if a_rec.get(k) != b_rec.get(k)
            }
        else:
            assert a == b, name


def no_litter(folder: Path) -> None:
    """No temporary of an output is left in ``folder``."""
    left = [p for p in folder.iterdir() if ".lorafuse-" in p.name]
    assert not left, [(p.name, sorted(c.name for c in p.iterdir()) if p.is_dir() else None) for p in left]


def _marked(folder: Path) -> bool:
    """The temporary holds its owner's whole marker (the process is killed mid-write, not mid-mkdir)."""
    try:
        return "pid" in json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False


class KillFirstWriter(threading.Thread):
    """Kills (SIGKILL) the first process seen writing ``output``: the PID in its temporary folder's name, once the
    folder holds its owner's whole marker (a process killed before the marker is written leaves a folder lorafuse
    never removes: it cannot tell it is its own)."""

    def __init__(self, output: Path):
        super().__init__(daemon=True)
        self.output = output
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        pattern = re.compile(rf"^\.{re.escape(self.output.name)}\.lorafuse-tmp-(\d+)$")
        while not self.stop.is_set():
            try:
                names = os.listdir(self.output.parent)
            except FileNotFoundError:
                names = []
            for name in names:
                match = pattern.match(name)
                if match and _marked(self.output.parent / name) and int(match.group(1)) != os.getpid():
                    self.killed = int(match.group(1))
                    os.kill(self.killed, signal.SIGKILL)
                    return
            time.sleep(0.0005)
