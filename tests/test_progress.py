"""One progress bar (bytes done of the total, rate, time left) on a terminal for merge (the prefill copy
counted), verify, combine, extract and lora-merger; none with --quiet, none when stderr is not a terminal (only the
result is printed).

The terminal is a real pseudo-terminal (pty) with a window size, as a user's shell gives the command.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from helpers import make_peft_adapter, read_tensors

import lorafuse
from lorafuse import extract, merger, progress
from lorafuse.report import format_bytes

BAR = "merging: "
LORAFUSE = [sys.executable, "-m", "lorafuse"]
LORA_EXTRACTOR, LORA_MERGER = (
    [sys.executable, "-c", f"import sys; from lorafuse.cli.compat import {main}; sys.exit({main}())"]
    for main in ("extractor_main", "merger_main")
)


@pytest.fixture(scope="module")
def adapters(llama_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    return [
        make_peft_adapter(llama_untied, root / name, seed=seed, target_modules=["q_proj", "down_proj"])
        for name, seed in (("a", 1), ("b", 2))
    ]


@pytest.fixture(scope="module")
def tuned(llama_untied, adapters, tmp_path_factory):
    """A fine-tuned model for extract: the base with the first adapter merged."""
    out = tmp_path_factory.mktemp("tuned") / "model"
    lorafuse.merge(llama_untied, adapters[:1], out, show_progress=False)
    return out


def _run(args: list[str], terminal: bool, program: list[str] = LORAFUSE) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``PROGRAM ARGS``, stderr on a 120-column pty when ``terminal``."""
    command = [*program, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not terminal:
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the command closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out, _ = proc.communicate()
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def _bar_lines(stderr: str, name: str) -> list[str]:
    return [part.strip() for part in stderr.replace("\n", "\r").split("\r") if part.strip().startswith(name)]


def _assert_one_byte_bar(stderr: str, name: str) -> list[str]:
    """The bar's lines: bytes done of one total in lorafuse's units (report.format_bytes), elapsed<left, rate."""
    lines = _bar_lines(stderr, name)
    assert lines, stderr
    assert all(" of " in line and "B [" in line and "B/s]" in line and "<" in line for line in lines), lines
    assert len({line.split(" of ")[1].split(" [")[0] for line in lines}) == 1, lines  # one bar: one total
    return lines


def test_merge_verify_combine_and_extract_show_one_bar_each_on_a_terminal(llama_untied, adapters, tuned, tmp_path):
    out = tmp_path / "merged"
    code, stdout, stderr = _run(["merge", str(llama_untied), *map(str, adapters), "-o", str(out)], terminal=True)
    assert code == 0 and stdout.startswith(f"wrote {out}:")
    _assert_one_byte_bar(stderr, BAR)
    for command, name in (
        (["verify", str(out), "--no-output-check"], "verifying: "),
        (["combine", *map(str, adapters), "-o", str(tmp_path / "combined")], "combining: "),
    ):
        code, stdout, stderr = _run(command, terminal=True)
        assert code == 0, (command, stderr)
        _assert_one_byte_bar(stderr, name)
    # extract's bar counts the tuned model's bytes, not its tensors
    code, stdout, stderr = _run(["extract", str(llama_untied), str(tuned), "-o", str(tmp_path / "x")], terminal=True)
    assert code == 0 and stdout.startswith("wrote "), stderr
    (line, *_) = _assert_one_byte_bar(stderr, "extracting: ")
    assert f" of {format_bytes(_tensor_bytes(tuned))} [" in line, line


def _tensor_bytes(folder: Path) -> int:
    """The bytes of a model's tensors, as the safetensors library reads them."""
    return sum(t.numel() * t.element_size() for t in read_tensors(folder).values())


@pytest.mark.parametrize("terminal", [True, False])
def test_quiet_or_no_terminal_prints_no_bar(llama_untied, adapters, tmp_path, terminal):
    args = ["merge", str(llama_untied), str(adapters[0]), "-o", str(tmp_path / "m")] + (["-q"] if terminal else [])
    code, stdout, stderr = _run(args, terminal=terminal)
    assert code == 0 and stdout.startswith("wrote ")
    assert "%|" not in stderr and "B/s" not in stderr, stderr
    code, _stdout, stderr = _run(["verify", str(tmp_path / "m"), "--no-output-check"] + (["-q"] * terminal), terminal)
    assert code == 0 and "%|" not in stderr
    args = ["extract", str(llama_untied), str(tmp_path / "m"), "-o", str(tmp_path / "x")] + (["-q"] * terminal)
    code, stdout, stderr = _run(args, terminal)
    assert code == 0 and stdout.startswith("wrote ") and "%|" not in stderr and "B/s" not in stderr, stderr


class _Recorder:
    """Stands in for ByteBar: records the total and every update."""

    made: list[_Recorder] = []

    def __init__(self, total: int, desc: str, show: bool | None = None):
        self.total, self.done = total, 0
        _Recorder.made.append(self)

    def update(self, nbytes: int) -> None:
        self.done += nbytes

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize("prefill", ["1", "0"])
def test_the_bar_counts_every_output_byte_once_with_or_without_the_prefill(
    llama_untied, adapters, tmp_path, monkeypatch, prefill
):
    """With the prefill, untouched tensors are counted as the background copy places them (not when the kernel
    skips them, which would fill the bar before the copy is done), and merged ones by the kernel, never both."""
    monkeypatch.setenv("LORAFUSE_PREFILL", prefill)
    monkeypatch.setattr(merger, "ByteBar", _Recorder)
    copied: list[int] = []
    original = progress.PrefillProgress.copied
    monkeypatch.setattr(progress.PrefillProgress, "copied", lambda self, n, b: (copied.append(b), original(self, n, b)))
    _Recorder.made.clear()
    report = lorafuse.merge(llama_untied, adapters, tmp_path / "m")
    (bar,) = _Recorder.made
    assert bar.total == report.total_bytes and bar.done == bar.total
    assert (sum(copied) > 0) == (prefill == "1")  # the prefill did the copying it is counted for


def test_the_extract_bar_counts_every_tuned_byte_once(llama_untied, tuned, tmp_path, monkeypatch):
    monkeypatch.setattr(extract, "ByteBar", _Recorder)
    _Recorder.made.clear()
    extract.extract(llama_untied, tuned, tmp_path / "x", rank=4)
    (bar,) = _Recorder.made
    assert bar.total == _tensor_bytes(tuned) and bar.done == bar.total


@pytest.mark.parametrize("terminal", [True, False])
def test_the_seed_scripts_show_the_byte_bar_on_a_terminal_only(llama_untied, tuned, tmp_path, terminal):
    """lora-extractor and lora-merger (no --quiet: their flags are the original scripts') show lorafuse's bar."""
    lora = tmp_path / "lora.safetensors"
    args = ["--source-model", str(llama_untied), "--target-model", str(tuned), "--output", str(lora)]
    code, stdout, stderr = _run(args, terminal, LORA_EXTRACTOR)
    assert code == 0 and "Extraction statistics:" in stdout, stderr
    bars = [(stderr, "extracting: ", _tensor_bytes(tuned))]
    out = tmp_path / "merged.safetensors"
    args = ["--source-model", str(llama_untied), "--lora-model", str(lora), "--output", str(out)]
    code, stdout, stderr = _run(args, terminal, LORA_MERGER)
    assert code == 0 and f"Merged model saved to: {out}" in stdout, stderr
    bars.append((stderr, BAR, _tensor_bytes(llama_untied) // 2))  # written in bf16, the default
    for stderr, name, total in bars:
        if terminal:
            (line, *_) = _assert_one_byte_bar(stderr, name)
            assert f" of {format_bytes(total)} [" in line, line
        else:
            assert "%|" not in stderr and "B/s" not in stderr, stderr
