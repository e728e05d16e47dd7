"""The `lorafuse` command's flag rules (issue 10, item 7): `--weight` alike in merge, combine and verify, `--format`
is what a command writes and `--adapter-format` what it reads, `-v`/`-q` on either side of the sub-command, help
with no arguments, no torch to start, thread pools sized before numpy loads."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lorafuse.cli import build_parser, main
from lorafuse.cli.weight_flag import weights_apart
from lorafuse.formats import registered_formats
from lorafuse.writers import output_formats

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny"
BASE, ADAPTER = str(EXAMPLE / "base"), str(EXAMPLE / "adapter")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_no_arguments_prints_help_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "lorafuse"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lorafuse") and "merge" in proc.stdout and not proc.stderr


def test_weight_several_values_after_one_flag_equal_one_flag_each(tmp_path):
    one_each = ["merge", BASE, ADAPTER, ADAPTER, "-o", str(tmp_path / "a"), "--weight", "0.5", "--weight", "-1"]
    assert main(one_each) == 0
    # Several values after one flag, given BEFORE the positionals: they must not be swallowed as weights.
    assert main(["merge", "--weight", "0.5", "-1", BASE, ADAPTER, ADAPTER, "-o", str(tmp_path / "b")]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert main(["merge", BASE, ADAPTER, "-o", str(tmp_path / "c")]) == 0
    assert _files(tmp_path / "a") != _files(tmp_path / "c")  # the weights did change the merge


def test_weights_apart_keeps_positionals_and_bare_flags():
    assert weights_apart(["merge", "--weight", "0.5", "1", "b", "a"]) == [
        "merge",
        "--weight=0.5",
        "--weight=1",
        "b",
        "a",
    ]
    assert weights_apart(["--weight", "b"]) == ["--weight", "b"]  # argparse's own error follows
    assert weights_apart(["a", "--weights"]) == ["a", "--weights"]
    assert weights_apart(["--weights", "nan", "--", "3"]) == ["--weights=nan", "--", "3"]


@pytest.mark.parametrize(
    "command",
    [["merge", "B", "A1", "A2", "-o", "o"], ["combine", "A1", "A2", "-o", "o"], ["verify", "M", "--adapter", "A1"]],
)
def test_weight_is_the_same_flag_everywhere(command):
    parser = build_parser()
    name, rest = command[0], command[1:]
    for argv in (
        [name, "--weight", "0.5", "2", *rest],  # several values after one flag, before the positionals
        [*command, "--weight", "0.5", "2"],
        [*command, "--weight", "0.5", "--weight", "2"],  # once per adapter
    ):
        assert parser.parse_args(weights_apart(argv)).weight == [0.5, 2.0], argv


def test_combine_keeps_weights_as_an_alias():
    args = build_parser().parse_args(weights_apart(["combine", "A1", "A2", "-o", "o", "--weights", "0.5", "2"]))
    assert args.weight == [0.5, 2.0] and args.weight_flag == "--weights"


def test_nonfinite_weight_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["merge", BASE, ADAPTER, "-o", str(tmp_path / "o"), "--weight", "nan"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--weight" in err and not (tmp_path / "o").exists()


def test_format_is_what_a_command_writes_and_adapter_format_what_it_reads():
    parser = build_parser()
    merge = ["merge", "B", "A", "-o", "o"]
    assert parser.parse_args(merge).out_format == output_formats()[0]
    assert parser.parse_args([*merge, "--format", "bin"]).out_format == "bin"
    assert parser.parse_args([*merge, "--out-format", "bin"]).out_format == "bin"  # alias (the GGUF issue uses it)
    assert parser.parse_args(["extract", "B", "T", "-o", "o", "--format", "kohya"]).fmt == "kohya"
    assert parser.parse_args(["combine", "A1", "A2", "-o", "o", "--format", "peft"]).format == "peft"
    for command in (merge, ["inspect", "A"], ["verify", "M", "--adapter", "A"], ["combine", "A1", "-o", "o"]):
        for fmt in registered_formats():
            assert parser.parse_args([*command, "--adapter-format", fmt]).adapter_format == fmt
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--adapter-format", "no-such-format"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_and_quiet_on_either_side_of_the_command(where):
    parser = build_parser()
    for flag, dest in (("-v", "verbose"), ("-q", "quiet"), ("--quiet", "quiet")):
        argv = [flag, "inspect", "A"] if where == "before" else ["inspect", "A", flag]
        args = parser.parse_args(argv)
        assert getattr(args, dest) is True
        assert getattr(args, "quiet" if dest == "verbose" else "verbose") is False


def test_quiet_silences_warnings_not_errors(tmp_path, capsys, caplog):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in Path(ADAPTER).iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    # The base named in adapter_config.json is not used: a note on stderr, silenced by -q.
    assert main(["-q", "merge", BASE, str(adapter), "-o", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert main(["merge", "-q", BASE, str(tmp_path / "missing"), "-o", str(tmp_path / "o2")]) == 1
    assert "lorafuse: error:" in capsys.readouterr().err
    assert logging.getLogger("lorafuse").level == logging.NOTSET  # main leaves the logger as it found it


def test_verbose_and_quiet_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-v", "inspect", "A", "-q"])
    assert exc.value.code == 2 and "contradict" in capsys.readouterr().err


BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"  # import torch now fails


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"]])
def test_help_imports_no_torch(argv):
    code = (
        BLOCK_TORCH
        + f"from lorafuse.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_example_merge_imports_no_torch(tmp_path):
    code = (
        BLOCK_TORCH + "from lorafuse.cli import main\n"
        f"assert main(['merge', {BASE!r}, {ADAPTER!r}, '-o', {str(tmp_path / 'o')!r}]) == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# Records OMP_WAIT_POLICY at the moment numpy starts loading: calm_thread_pools() must have set it by then.
NUMPY_WATCH = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Watch())
from {module} import {function} as main
try:
    main({argv!r})
except SystemExit:
    pass
print("policy at numpy import:", seen)
"""


@pytest.mark.parametrize(
    ("module", "function", "argv"),
    [
        ("lorafuse.cli", "main", ["inspect", ADAPTER]),
        ("lorafuse.cli.compat", "merge_adapter_main", ["--adapter_repo_url", "/nonexistent", "--base_model", BASE]),
        ("lorafuse.cli.compat", "merger_main", ["--source-model", BASE, "--lora-model", "/x", "--output", "/x/o"]),
        ("lorafuse.cli.compat", "extractor_main", ["--source-model", BASE, "--target-model", "/x", "--output", "o"]),
    ],
)
def test_console_scripts_calm_thread_pools_before_numpy_loads(module, function, argv, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    code = NUMPY_WATCH.format(module=module, function=function, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "policy at numpy import: ['PASSIVE']" in proc.stdout, proc.stdout + proc.stderr


def test_console_scripts_point_at_the_light_entry_points():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for line in (
        'lorafuse = "lorafuse.cli:main"',
        'merge-adapter = "lorafuse.cli.compat:merge_adapter_main"',
        'lora-extractor = "lorafuse.cli.compat:extractor_main"',
        'lora-merger = "lorafuse.cli.compat:merger_main"',
    ):
        assert line in text
