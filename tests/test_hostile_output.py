"""Issue 15, outputs: no command may replace an input, the final rename never replaces what appeared after the
check, SIGTERM cleans up like Ctrl-C, temporaries of killed runs are removed on the next run, failed runs leave
no parents behind, and write errors (read-only disk, full disk) and a closed stdout end in one line or quietly.

Commands run in-process where they can (fast) and as child processes where signals, pipes or two processes at
once are the point. Every child is held at the final rename by a hook (``HOOK``) so that timing never decides.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hostile import ENTRY_POINTS, Result, assert_no_litter, assert_refused, snapshot
from safetensors.torch import load_file, save_file

from lorafuse import cli
from lorafuse.cli import compat
from lorafuse.cli.compat import merge_adapter
from lorafuse.errors import OutputError
from lorafuse.io import output as output_module
from lorafuse.io.output import MARKER, AtomicOutput, check_output, remove_stale_temporaries

W = "model.layers.0.self_attn.q_proj.weight"
MAINS = {
    "lorafuse": cli.main,
    "merge-adapter": compat.merge_adapter_main,
    "lora-extractor": compat.extractor_main,
    "lora-merger": compat.merger_main,
}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --- inputs --------------------------------------------------------------------------------------------------


def _model(folder: Path, seed: int, dim: int, tokenizer_bytes: int) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {W: torch.randn(dim, dim, generator=g), "model.norm.weight": torch.ones(dim)}, folder / "model.safetensors"
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": dim}))
    (folder / "tokenizer.json").write_text("x" * tokenizer_bytes)
    return folder


def _adapter(folder: Path, dim: int, rank: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(rank, dim, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(dim, rank, generator=g),
        },
        folder / "adapter_model.safetensors",
    )
    return folder


def _world(root: Path, dim: int = 8, rank: int = 2, tokenizer_bytes: int = 2) -> SimpleNamespace:
    """base and tuned models, two adapters, all inside ``root`` (a few KB)."""
    return SimpleNamespace(
        root=root,
        base=_model(root / "base", 0, dim, tokenizer_bytes),
        tuned=_model(root / "tuned", 1, dim, tokenizer_bytes),
        adapter=_adapter(root / "adapter", dim, rank, 2),
        adapter2=_adapter(root / "adapter2", dim, rank, 3),
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-output") / "w"
    _world(root)
    return root


@pytest.fixture
def world(template, tmp_path, monkeypatch) -> SimpleNamespace:
    """A private copy of the tiny inputs; the working directory is its root (merge-adapter's default folders)."""
    root = shutil.copytree(template, tmp_path / "w")
    monkeypatch.chdir(root)
    for var, _default in merge_adapter.DEFAULTS.values():
        monkeypatch.delenv(var, raising=False)
    return SimpleNamespace(
        root=root, base=root / "base", tuned=root / "tuned", adapter=root / "adapter", adapter2=root / "adapter2"
    )


def run_here(command: str, *args: str | os.PathLike) -> Result:
    """A console script in this process (no torch import per call): exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = MAINS[command]([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


def _merge_adapter_args(world, output_dir, work_dir="work", *extra) -> list:
    return [
        "--base_model",
        world.base,
        "--adapter_repo_url",
        world.adapter,
        "--output_dir",
        output_dir,
        "--work_dir",
        work_dir,
        *extra,
    ]


def _litter(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if "lorafuse-" in p.name)


# --- an output never is, holds or lies inside an input --------------------------------------------------------

# (command, arguments with {base} {tuned} {adapter} {root} {link}, what the error line names)
REPLACE_INPUT = {
    "merge-into-base": ("lorafuse", "merge {base} {adapter} -o {base}", "base"),
    "merge-onto-base-weights": ("lorafuse", "merge {base} {adapter} -o {base}/model.safetensors", "base"),
    "merge-into-adapter": ("lorafuse", "merge {base} {adapter} -o {adapter}", "adapter"),
    "merge-onto-adapter-weights": (
        "lorafuse",
        "merge {base} {adapter} -o {adapter}/adapter_model.safetensors",
        "adapter",
    ),
    "merge-inside-base": ("lorafuse", "merge {base} {adapter} -o {base}/merged", "base"),
    "merge-over-all-inputs": ("lorafuse", "merge {base} {adapter} -o {root}", "input"),
    "merge-through-a-link": ("lorafuse", "merge {base} {adapter} -o {link}", "base"),
    "merge-torch-path-bin": ("lorafuse", "merge {base} {adapter} -o {base}/pytorch_model.bin --format bin", "base"),
    "extract-into-tuned": ("lorafuse", "extract {base} {tuned} -o {tuned} --rank 2", "tuned"),
    "extract-onto-tuned-weights": (
        "lorafuse",
        "extract {base} {tuned} -o {tuned}/model.safetensors --format kohya",
        "tuned",
    ),
    "extract-inside-base": ("lorafuse", "extract {base} {tuned} -o {base}/lora --rank 2", "base"),
    "combine-into-adapter": ("lorafuse", "combine {adapter} {adapter2} -o {adapter}", "adapter"),
    "combine-onto-weights": (
        "lorafuse",
        "combine {adapter} {adapter2} -o {adapter2}/adapter_model.safetensors",
        "adapter2",
    ),
    "combine-into-its-base": ("lorafuse", "combine {adapter} {adapter2} --base {base} -o {base}/c", "base"),
    "lora-merger-base-model": (
        "lora-merger",
        "--source-model {base} --lora-model {adapter} --output {base}/model",
        "base",
    ),
    "lora-merger-same-file": (
        "lora-merger",
        "--source-model {base}/model.safetensors --lora-model {adapter} --output {base}/model",
        "base",
    ),
    "lora-merger-into-lora": (
        "lora-merger",
        "--source-model {base} --lora-model {adapter} --output {adapter}/x",
        "adapter",
    ),
    "lora-extractor-tuned-model": (
        "lora-extractor",
        "--source-model {base} --target-model {tuned} --output {tuned}/model",
        "tuned",
    ),
    "lora-extractor-pytorch": (
        "lora-extractor",
        "--source-model {base} --target-model {tuned} --output {base}/model --output-format pytorch",
        "base",
    ),
}
# The seed scripts have no --overwrite: they replace an output file as the original scripts did (never an input).
OVERWRITE_FLAG = {"lorafuse": ["--overwrite"], "lora-merger": [], "lora-extractor": []}
REPLACE_INPUT_RUNS = [
    pytest.param(case, overwrite, id=f"{case}-{'overwrite' if overwrite else 'plain'}")
    for case in sorted(REPLACE_INPUT)
    for overwrite in ([False, True] if OVERWRITE_FLAG[REPLACE_INPUT[case][0]] else [False])
]


@pytest.mark.parametrize(("case", "overwrite"), REPLACE_INPUT_RUNS)
def test_no_command_writes_over_or_into_an_input(case, overwrite, world):
    command, template, needle = REPLACE_INPUT[case]
    (world.root / "link").symlink_to(world.base)
    args = template.format(
        base=world.base,
        tuned=world.tuned,
        adapter=world.adapter,
        root=world.root,
        link=world.root / "link",
        adapter2=world.adapter2,
    ).split()
    before = snapshot(world.root)
    result = run_here(command, *args, *(OVERWRITE_FLAG[command] if overwrite else []))
    line = assert_refused(result, needle, code=1)
    assert "input" in line and "outside every input" in line
    assert snapshot(world.root) == before  # inputs byte for byte, and nothing written anywhere


def test_a_link_inside_an_input_folder_protects_its_target(world):
    """base/notes.json links to a file outside: that file is read as an input, so it may not be replaced."""
    victim = world.root / "victim"
    victim.write_text("mine")
    (world.base / "notes.json").symlink_to(victim)
    before = snapshot(world.root)
    result = run_here("lorafuse", "merge", world.base, world.adapter, "-o", victim, "--overwrite")
    assert_refused(result, "victim", code=1)
    assert snapshot(world.root) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(
    ("work", "out", "needle"),
    [
        ("{base}", "merged", "work_dir"),
        ("{adapter}", "merged", "work_dir"),
        ("{root}", "{root}/merged", "work_dir"),  # holds every input
        ("{base}/work", "merged", "work_dir"),
        ("work", "{base}", "output_dir"),
        ("work", "{adapter}/merged", "output_dir"),
        ("same", "same", "overlap"),
        ("work", "work/merged", "overlap"),
    ],
)
def test_merge_adapter_never_empties_an_input(work, out, needle, overwrite, world):
    names = {"base": world.base, "adapter": world.adapter, "root": world.root}
    args = _merge_adapter_args(
        world, out.format(**names), work.format(**names), *(["--overwrite"] if overwrite else [])
    )
    before = snapshot(world.root)
    result = run_here("merge-adapter", *args)
    assert result.code == 1 and "Traceback" not in result.err
    failed = [line for line in result.out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and needle in failed[0], result.out
    assert snapshot(world.root) == before  # checked before the work folder was emptied or created


# --- the final rename replaces only what was checked ------------------------------------------------------------


def _merge_here(world, out: Path, *extra: str) -> Result:
    return run_here("lorafuse", "merge", world.base, world.adapter, "-o", out, *extra)


@pytest.fixture(params=["prefill", "no-prefill"])
def engine(request, monkeypatch) -> str:
    """Both ways a merge builds its output commit through AtomicOutput: adopting the prefill's folder, or not."""
    if request.param == "no-prefill":
        monkeypatch.setenv("LORAFUSE_PREFILL", "0")
    return request.param


def _hold_commit(monkeypatch, before_commit) -> None:
    """Run ``before_commit(output)`` between the output check and the final rename (as a user or another run)."""
    real = AtomicOutput.commit

    def commit(self):
        before_commit(self.final)
        return real(self)

    monkeypatch.setattr(AtomicOutput, "commit", commit)


@pytest.mark.parametrize("state", ["absent", "empty", "existing"])
def test_a_file_put_into_the_output_meanwhile_is_kept(state, engine, world, monkeypatch):
    out = world.root / "merged"
    extra = []
    if state != "absent":
        out.mkdir()
    if state == "existing":
        (out / "old.txt").write_text("allowed to go")
        extra = ["--overwrite"]

    def user_writes(final: Path) -> None:
        final.mkdir(exist_ok=True)
        (final / "notes.txt").write_text("written by the user while the merge ran")

    _hold_commit(monkeypatch, user_writes)
    result = _merge_here(world, out, *extra)
    assert_refused(result, str(out), "while lorafuse was writing", code=1)
    expected = {"notes.txt", *(["old.txt"] if state == "existing" else [])}
    assert {p.name for p in out.iterdir()} == expected
    assert (out / "notes.txt").read_text() == "written by the user while the merge ran"
    assert _litter(world.root) == []


def test_an_output_another_run_put_in_place_meanwhile_is_kept(engine, world, monkeypatch):
    out = world.root / "merged"
    out.mkdir()
    (out / "old.txt").write_text("allowed to go")

    def other_run(final: Path) -> None:  # what a concurrent merge's commit does: a new folder at the path
        other = final.parent / "other"
        other.mkdir()
        (other / "model.safetensors").write_text("the other run's output")
        shutil.rmtree(final)
        other.rename(final)

    _hold_commit(monkeypatch, other_run)
    result = _merge_here(world, out, "--overwrite")
    assert_refused(result, "while lorafuse was writing", code=1)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the other run's output"
    assert _litter(world.root) == []


def test_an_unchanged_output_is_replaced_with_overwrite(engine, world):
    out = world.root / "merged"
    out.mkdir()
    (out / "old.txt").write_text("allowed to go")
    assert _merge_here(world, out, "--overwrite").code == 0
    assert "old.txt" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()
    assert not (out / MARKER).exists() and _litter(world.root) == []


# Each writing command, with what appears at its output between its check and its AtomicOutput.
APPEARS = {
    "merge": ("lorafuse", "merge {base} {adapter} -o {out}", "out", True),
    "merge-bin": ("lorafuse", "merge {base} {adapter} -o {out} --format bin", "out", True),
    "merge-single-file": (
        "lorafuse",
        "merge {base}/model.safetensors {adapter} -o {out}.safetensors",
        "out.safetensors",
        False,
    ),
    "extract": ("lorafuse", "extract {base} {tuned} -o {out} --rank 2", "out", True),
    "extract-kohya": (
        "lorafuse",
        "extract {base} {tuned} -o {out}.safetensors --format kohya --rank 2",
        "out.safetensors",
        False,
    ),
    "combine": ("lorafuse", "combine {adapter} {adapter2} -o {out}", "out", True),
    "lora-merger": (
        "lora-merger",
        "--source-model {base} --lora-model {adapter} --output {out}",
        "out.safetensors",
        False,
    ),
    "lora-extractor": (
        "lora-extractor",
        "--source-model {base} --target-model {tuned} --output {out}",
        "out.safetensors",
        False,
    ),
    "merge-adapter": (
        "merge-adapter",
        "--base_model {base} --adapter_repo_url {adapter} --output_dir {out} --work_dir work",
        "out",
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(APPEARS))
def test_every_command_keeps_what_appeared_after_its_check(case, world, monkeypatch):
    """The output appears between the command's check and the creation of its temporary: the state the check
    recorded must reach the commit (a state taken later would let the commit replace the newcomer)."""
    command, template, name, is_dir = APPEARS[case]
    out = world.root / "out"
    final = world.root / name
    real_init = AtomicOutput.__init__

    def appear_then_init(self, path, *args, **kwargs):
        if Path(path).absolute() == final and not final.exists():
            if is_dir:
                final.mkdir()
                (final / "mine.txt").write_text("keep")
            else:
                final.write_text("keep")
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(AtomicOutput, "__init__", appear_then_init)
    args = template.format(base=world.base, tuned=world.tuned, adapter=world.adapter, adapter2=world.adapter2, out=out)
    result = run_here(command, *args.split())
    assert result.code == 1 and "Traceback" not in result.err
    assert "while lorafuse was writing" in (result.out + result.err)
    assert (final / "mine.txt").read_text() == "keep" if is_dir else final.read_text() == "keep"
    assert _litter(world.root) == []


def test_atomic_output_of_a_file_never_replaces_one_that_appeared(tmp_path, monkeypatch):
    """rename without replacing: renameat2(RENAME_NOREPLACE), else a hard link, else a check just before."""

    def no_hard_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    for name in ("renameat2", "link", "check"):  # each step turns off one more of the three ways
        if name == "link":
            monkeypatch.setattr(output_module, "_renameat2_noreplace", lambda src, dst: False)
        if name == "check":
            monkeypatch.setattr(os, "link", no_hard_links)
        final = tmp_path / f"{name}.safetensors"
        checked = check_output(final, False, [])
        with pytest.raises(OutputError, match="while lorafuse was writing"):
            with AtomicOutput(final, is_dir=False, checked=checked) as out:
                out.tmp.write_text("ours")
                final.write_text("theirs")
                out.commit()
        assert final.read_text() == "theirs" and _litter(tmp_path) == []
        final.unlink()
        with AtomicOutput(final, is_dir=False, checked=check_output(final, False, [])) as out:
            out.tmp.write_text("ours")
            out.commit()
        assert final.read_text() == "ours" and _litter(tmp_path) == []


# Held at the final rename until the file named by LORAFUSE_TEST_GO exists; says so in LORAFUSE_TEST_READY/PID.
HOOK = """
import os, sys, time
from pathlib import Path
import lorafuse.io.output as output
real_commit = output.AtomicOutput.commit
def held_commit(self):
    Path(os.environ["LORAFUSE_TEST_READY"], str(os.getpid())).touch()
    while not Path(os.environ["LORAFUSE_TEST_GO"]).exists():
        time.sleep(0.02)
    return real_commit(self)
output.AtomicOutput.commit = held_commit
"""


def _start(command: str, *args, hold: Path, cwd: Path) -> subprocess.Popen:
    (hold / "ready").mkdir(parents=True, exist_ok=True)
    script = f"{HOOK}\n{ENTRY_POINTS[command]}\nsys.exit(main(sys.argv[1:]))"
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "LORAFUSE_TEST_READY": str(hold / "ready"),
        "LORAFUSE_TEST_GO": str(hold / "go"),
    }
    for var, _default in merge_adapter.DEFAULTS.values():
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env=env,
    )


def _wait_until_held(procs: list[subprocess.Popen], hold: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list((hold / "ready").iterdir())) < len(procs):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()}")
        assert time.monotonic() < deadline, "the command never reached its final rename"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> Result:
    out, err = proc.communicate(timeout=120)
    return Result(proc.returncode, out, err)


@pytest.mark.parametrize("state", ["absent", "existing"])
def test_two_merges_into_one_output_one_wins(state, world, tmp_path):
    out = world.root / "merged"
    extra = []
    if state == "existing":
        out.mkdir()
        (out / "old.txt").write_text("allowed to go")
        extra = ["--overwrite"]
    hold = tmp_path / "hold"
    adapters = [world.adapter, world.adapter2]
    procs = [
        _start("lorafuse", "merge", world.base, adapter, "-o", out, *extra, hold=hold, cwd=world.root)
        for adapter in adapters
    ]
    _wait_until_held(procs, hold)  # both checked the output and wrote their temporaries
    (hold / "go").touch()
    results = [_finish(proc) for proc in procs]
    assert sorted(r.code for r in results) == [0, 1], results
    assert_refused(results[[r.code for r in results].index(1)], str(out), "while lorafuse was writing")
    winner = adapters[[r.code for r in results].index(0)]
    provenance = json.loads((out / "lorafuse_merge.json").read_text())
    assert [a["path"] for a in provenance["adapters"]] == [str(winner)]  # the winner's output, complete
    assert set(load_file(out / "model.safetensors")) == {W, "model.norm.weight"}
    assert not (out / "old.txt").exists() and _litter(world.root) == []


# --- SIGTERM like Ctrl-C; temporaries of killed runs ------------------------------------------------------------

SIGNAL_CASES = {
    "merge-sigterm": ("lorafuse", signal.SIGTERM, 143, "terminated"),
    "merge-sigint": ("lorafuse", signal.SIGINT, 130, "interrupted"),
    "merge-adapter-sigterm": ("merge-adapter", signal.SIGTERM, 143, "terminated"),
    "lora-merger-sigterm": ("lora-merger", signal.SIGTERM, 143, "terminated"),
}


@pytest.mark.parametrize("case", sorted(SIGNAL_CASES))
def test_a_signal_during_the_write_removes_the_temporary(case, world, tmp_path):
    command, sig, code, word = SIGNAL_CASES[case]
    out = world.root / "merged"
    args = {
        "lorafuse": ["merge", world.base, world.adapter, "-o", out],
        "merge-adapter": _merge_adapter_args(world, out),
        "lora-merger": ["--source-model", world.base, "--lora-model", world.adapter, "--output", out],
    }[command]
    before = snapshot(world.base, world.adapter)
    hold = tmp_path / "hold"
    proc = _start(command, *args, hold=hold, cwd=world.root)
    _wait_until_held([proc], hold)
    assert _litter(world.root), "the temporary output should exist while the command is held"
    proc.send_signal(sig)
    result = _finish(proc)
    assert result.code == code, result
    assert "Traceback" not in result.err
    lines = [line for line in (result.out + result.err).splitlines() if word in line]
    assert len(lines) == 1 and "not" in lines[0], result
    assert _litter(world.root) == [] and not out.exists() and not out.with_suffix(".safetensors").exists()
    assert snapshot(world.base, world.adapter) == before


def _marked(folder: Path, pid: int, start: str | None = None, host: str | None = None) -> Path:
    """A temporary as lorafuse marks it, made by process ``pid``."""
    folder.mkdir()
    owner = {"pid": pid, "host": host or socket.gethostname(), "start": start}
    (folder / MARKER).write_text(json.dumps(owner))
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(world):
    out = world.root / "merged"
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        live, reused = (s.pid for s in sleepers)
        dead = _dead_pid()
        tmp = world.root / ".merged.lorafuse-tmp-"
        stale = _marked(Path(f"{tmp}{dead}"), dead)
        (stale / "model.safetensors").write_bytes(b"half a model")
        kept = {
            _marked(Path(f"{tmp}{live}"), live, output_module._start_time(live)).name,  # a run still writing
            _marked(Path(f"{tmp}{dead + 1}"), dead + 1, host="elsewhere").name,  # another machine's (shared disk)
        }
        unmarked = Path(f"{tmp}{dead + 2}")
        unmarked.mkdir()  # not known to be lorafuse's: never removed
        kept.add(unmarked.name)
        _marked(Path(f"{tmp}{reused}"), reused, "not the start time of this process")  # the PID names another now
        result = _merge_here(world, out)
        assert result.code == 0, result
        assert set(_litter(world.root)) == kept
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


def test_a_killed_merge_leaves_a_temporary_the_next_run_removes(world, tmp_path):
    out = world.root / "merged"
    hold = tmp_path / "hold"
    proc = _start("lorafuse", "merge", world.base, world.adapter, "-o", out, hold=hold, cwd=world.root)
    _wait_until_held([proc], hold)
    proc.kill()  # SIGKILL: no clean-up can run
    proc.communicate(timeout=60)
    stale = world.root / f".merged.lorafuse-tmp-{proc.pid}"
    assert stale.is_dir() and (stale / MARKER).is_file()
    result = _merge_here(world, out)
    assert result.code == 0, result
    assert _litter(world.root) == [] and (out / "model.safetensors").is_file()


def _moved_aside(root: Path, content: str) -> Path:
    """What a run killed inside its commit leaves: the old output moved into a marked ``.lorafuse-old`` folder."""
    dead = _dead_pid()
    aside = _marked(root / f".merged.lorafuse-old-{dead}", dead)
    (aside / "merged").mkdir()
    (aside / "merged" / "keep.txt").write_text(content)
    return aside


def test_an_output_a_killed_commit_had_moved_aside_is_put_back(world):
    """Killed between moving the old output aside and renaming the new one in: the old output is restored
    (never deleted without its replacement), so the next run without --overwrite refuses it by name."""
    out = world.root / "merged"
    _moved_aside(world.root, "the previous output")
    result = _merge_here(world, out)
    assert_refused(result, str(out), "exists and is not empty", code=1)
    assert (out / "keep.txt").read_text() == "the previous output" and _litter(world.root) == []
    # Killed after the second rename: the replacement is in place, the moved-aside copy just goes.
    _moved_aside(world.root, "replaced already")
    remove_stale_temporaries(out)
    assert (out / "keep.txt").read_text() == "the previous output" and _litter(world.root) == []


# --- parents: created only after the inputs were validated, removed on failure -----------------------------------

FAILING = {
    "merge-bad-adapter": ("lorafuse", "merge {base} {base} -o {out}"),
    "merge-missing-adapter": ("lorafuse", "merge {base} {root}/nothing -o {out}"),
    "extract-missing-tuned": ("lorafuse", "extract {base} {root}/nothing -o {out}"),
    "combine-bad-adapter": ("lorafuse", "combine {adapter} {base} -o {out}"),
    "lora-merger-bad-lora": ("lora-merger", "--source-model {base} --lora-model {base} --output {out}"),
    "lora-extractor-missing": ("lora-extractor", "--source-model {base} --target-model {root}/nothing --output {out}"),
    "merge-adapter-bad-adapter": (
        "merge-adapter",
        "--base_model {base} --adapter_repo_url {base} --output_dir {out} --work_dir {root}/new/work",
    ),
}


@pytest.mark.parametrize("case", sorted(FAILING))
def test_a_failed_command_leaves_no_parent_folders(case, world):
    command, template = FAILING[case]
    out = world.root / "new" / "a" / "b" / "out"
    args = template.format(base=world.base, adapter=world.adapter, root=world.root, out=out).split()
    before = snapshot(world.root)
    result = run_here(command, *args)
    assert result.code == 1 and "Traceback" not in result.err, result
    assert not (world.root / "new").exists()
    assert snapshot(world.root) == before


def test_a_write_error_after_the_checks_removes_the_parents_it_created(world, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lorafuse.writers.folder.copy_extra_files", full_disk)
    out = world.root / "new" / "a" / "b" / "out"
    before = snapshot(world.root)
    assert_refused(_merge_here(world, out), str(out), "No space left on device", code=1)
    assert snapshot(world.root) == before


# --- write errors: a read-only disk, a full disk (root: a tiny tmpfs) --------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture
def disk(tmp_path):
    """mount(options) -> a folder on a fresh tmpfs; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        _mount_tmpfs(where, options)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


WRITERS = {
    "merge": ("lorafuse", "merge {base} {adapter} -o {out}"),
    "merge-bin": ("lorafuse", "merge {base} {adapter} -o {out} --format bin"),
    "merge-new-parents": ("lorafuse", "merge {base} {adapter} -o {out}/a/b"),
    "extract": ("lorafuse", "extract {base} {tuned} -o {out} --diff-only"),
    "extract-pt": ("lorafuse", "extract {base} {tuned} -o {out}.pt --format kohya --diff-only"),
    "combine": ("lorafuse", "combine {adapter} {adapter2} -o {out}"),
    "lora-merger": ("lora-merger", "--source-model {base} --lora-model {adapter} --output {out}"),
    "lora-merger-pytorch": (
        "lora-merger",
        "--source-model {base} --lora-model {adapter} --output {out} --output-format pytorch",
    ),
    "lora-extractor": ("lora-extractor", "--source-model {base} --target-model {tuned} --output {out} --diff-only"),
    "lora-extractor-pytorch": (
        "lora-extractor",
        "--source-model {base} --target-model {tuned} --output {out} --output-format pytorch --diff-only",
    ),
    "merge-adapter": (
        "merge-adapter",
        "--base_model {base} --adapter_repo_url {adapter} --output_dir {out} --work_dir work",
    ),
    "merge-adapter-work-dir": (
        "merge-adapter",
        "--base_model {base} --adapter_repo_url {adapter} --output_dir merged --work_dir {out}",
    ),
}


def _one_failure_line(result: Result, *needles: str) -> str:
    """The command's one error line (merge-adapter prints its FAILED line on stdout)."""
    assert result.code == 1 and "Traceback" not in result.err, result
    lines = [line for line in (result.out + result.err).splitlines() if "error:" in line or "FAILED" in line]
    assert len(lines) == 1, result
    assert "unexpected" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", sorted(WRITERS))
def test_a_read_only_output_disk_is_one_line(case, world, disk):
    command, template = WRITERS[case]
    read_only = disk("ro,size=64k")
    out = read_only / "out"
    args = template.format(base=world.base, tuned=world.tuned, adapter=world.adapter, adapter2=world.adapter2, out=out)
    before = snapshot(world.root)
    line = _one_failure_line(run_here(command, *args.split()), "Read-only file system", str(read_only))
    assert "writable disk" in line
    assert snapshot(world.root) == before  # checked before anything (merge-adapter's work folder) was made


@pytest.fixture
def big(tmp_path, monkeypatch) -> SimpleNamespace:
    """Inputs whose outputs do not fit an 8 KB disk (a 64x64 weight, rank-16 adapters); a 100 KB tokenizer.json."""
    world = _world(tmp_path / "big", dim=64, rank=16, tokenizer_bytes=100_000)
    monkeypatch.chdir(world.root)
    for var, _default in merge_adapter.DEFAULTS.values():
        monkeypatch.delenv(var, raising=False)
    return world


@pytest.mark.parametrize("case", sorted(set(WRITERS) - {"merge-adapter-work-dir"}))  # a local adapter is not cloned
def test_a_full_disk_is_one_line_and_leaves_nothing(case, big, disk):
    command, template = WRITERS[case]
    full = disk("size=8k")
    out = full / "out"
    args = template.format(base=big.base, tuned=big.tuned, adapter=big.adapter, adapter2=big.adapter2, out=out)
    before = snapshot(big.base, big.tuned, big.adapter, big.adapter2)
    line = _one_failure_line(run_here(command, *args.split()), "No space left on device", str(full))
    assert "free some space" in line
    assert_no_litter(full)
    assert snapshot(big.base, big.tuned, big.adapter, big.adapter2) == before


@pytest.mark.parametrize("command", ["lorafuse", "merge-adapter"])
def test_a_full_disk_during_the_extra_file_copy(command, big, disk):
    """The weights fit (64 KB disk), the base's 100 KB tokenizer.json does not."""
    full = disk("size=64k")
    out = full / "out"
    args = ["merge", big.base, big.adapter, "-o", out] if command == "lorafuse" else _merge_adapter_args(big, out)
    _one_failure_line(run_here(command, *args), "No space left on device", str(out), "free some space")
    assert_no_litter(full)


# --- stdout closed early (| head) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["inspect", "{base}"], ["inspect", "{adapter}", "--json"], ["extract", "{base}", "{tuned}", "-o", "{out}"]],
    ids=["inspect", "inspect-json", "extract"],
)
def test_a_closed_stdout_ends_quietly(args, world):
    read, write = os.pipe()
    os.close(read)  # as `| head -c 10` does once it has read enough: every write now fails with EPIPE
    try:
        argv = [a.format(base=world.base, adapter=world.adapter, tuned=world.tuned, out=world.root / "x") for a in args]
        script = f"import sys; {ENTRY_POINTS['lorafuse']}; sys.exit(main(sys.argv[1:]))"
        proc = subprocess.run(
            [sys.executable, "-c", script, *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    finally:
        os.close(write)
    assert proc.returncode == 128 + signal.SIGPIPE, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr and "Error" not in proc.stderr
    if args[0] == "extract":  # the output was complete before the report could not be printed
        assert (world.root / "x" / "adapter_model.safetensors").is_file() and _litter(world.root) == []


def test_a_temporary_of_a_killed_unreaped_process_is_stale(tmp_path):
    """A worker killed but not yet reaped (a zombie, until its pool or Ray collects it) wrote nothing more."""
    from lorafuse.io.output import MARKER, remove_stale_temporaries

    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        work = tmp_path / f".out.lorafuse-tmp-{child.pid}"
        work.mkdir()
        stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()
        (work / MARKER).write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(), "start": stat[19]}))
        remove_stale_temporaries(out)
        assert work.exists()  # alive: kept
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.01)
        remove_stale_temporaries(out)  # a zombie now: the child is not waited for yet
        assert not work.exists()
    finally:
        child.kill()
        child.wait()
