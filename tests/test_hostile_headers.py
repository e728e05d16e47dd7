"""Hostile safetensors headers: every malformation the safetensors library refuses is refused by every command.

Each class of bad header (overlapping, reversed or negative offsets, a byte count that is not dtype x shape,
negative or huge shapes, a duplicate key pointing at other bytes, a gap, trailing bytes, a non-dict
``__metadata__``, deeply nested JSON, an unknown dtype) is written into a copy of a real tiny base or adapter (the
8-byte length, the JSON and the data, by hand) and fed to ``lorafuse merge`` (with its prefill and
``LORAFUSE_PREFILL=0``), ``merge --verify``, ``inspect``, ``combine`` and ``lora-merger``. Each must exit non-zero
with one line naming the file (and the tensor at fault), leave the inputs byte for byte unchanged and write
nothing beside the output.

The whole matrix runs in-process (one ``import torch`` for all of it); one command per class also runs as a real
child process through :func:`hostile.run_command`, so exit codes and the absence of tracebacks are checked for real.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hostile import Result, assert_no_litter, assert_refused, run_command, snapshot
from safetensors.torch import save_file

from lorafuse.errors import InputError, LorafuseError
from lorafuse.io.safetensors_header import read_raw_header
from lorafuse.report import PROVENANCE_NAME
from lorafuse.verify import verify

FIX = "re-download or re-export it"
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
BASE_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


# --- tiny inputs --------------------------------------------------------------------------------------------------


def _write_inputs(root: Path) -> tuple[Path, Path]:
    """A two-projection base (F32, a few hundred bytes) and a rank-2 PEFT LoRA on both projections."""
    gen = torch.Generator().manual_seed(0)
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(16, 8, generator=gen),
            f"{Q}.weight": torch.randn(8, 8, generator=gen),
            f"{K}.weight": torch.randn(8, 8, generator=gen),
            "model.norm.weight": torch.randn(8, generator=gen),
        },
        base / BASE_FILE,
        metadata={"format": "pt"},
    )
    (base / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
    save_file(
        {
            f"base_model.model.{m}.lora_{kind}.weight": torch.randn(shape, generator=gen) * 0.1
            for m in (Q, K)
            for kind, shape in (("A", (2, 8)), ("B", (8, 2)))
        },
        adapter / ADAPTER_FILE,
        metadata={"format": "pt"},
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"], "bias": "none"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    return _write_inputs(tmp_path_factory.mktemp("pristine"))


# --- writing bad headers by hand ----------------------------------------------------------------------------------


def split_file(path: Path) -> tuple[dict, bytes]:
    """(header dict in file order, data section) of a valid safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_file(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _edit_second(change: Callable[[dict], None]) -> Callable[[dict, bytes], tuple[str, bytes, str]]:
    """A malformation that edits the entry of the second tensor (by offset): it is the tensor at fault."""

    def apply(header: dict, data: bytes) -> tuple[str, bytes, str]:
        name = tensors_by_offset(header)[1]
        change(header[name])
        return json.dumps(header), data, name

    return apply


def _shift(entry: dict, delta: int) -> None:
    entry["data_offsets"] = [o + delta for o in entry["data_offsets"]]


def _overlap(entry: dict) -> None:
    _shift(entry, -4)


def _reversed(entry: dict) -> None:
    entry["data_offsets"] = entry["data_offsets"][::-1]


def _negative_offset(entry: dict) -> None:
    entry["data_offsets"] = [-4, entry["data_offsets"][1]]


def _size_mismatch(entry: dict) -> None:
    entry["shape"][0] -= 1  # fewer elements than bytes: a reader trusting the shape reads the wrong rows


def _negative_shape(entry: dict) -> None:
    entry["shape"][0] = -entry["shape"][0]


def _huge_shape(entry: dict) -> None:
    entry["shape"] = [2**31, 2**31, 2**31]  # overflows int64: OverflowError on the torch path before


def _unknown_dtype(entry: dict) -> None:
    entry["dtype"] = "Q4_K"


def _deep_nesting(entry: dict) -> None:
    entry["x"] = "NEST"  # replaced in the text: json.dumps itself would recurse too deeply


def _deep(header: dict, data: bytes) -> tuple[str, bytes, str]:
    text, data, _name = _edit_second(_deep_nesting)(header, data)
    return text.replace('"NEST"', "[" * 5000 + "]" * 5000), data, ""


def _duplicate_key(header: dict, data: bytes) -> tuple[str, bytes, str]:
    """The second tensor's name appears again, pointing at the first tensor's bytes (JSON readers keep the last)."""
    first, second = tensors_by_offset(header)[:2]
    text = json.dumps(header)
    extra = json.dumps({second: header[first]})[1:-1]
    return text[:-1] + ", " + extra + "}", data, second


def _gap(header: dict, data: bytes) -> tuple[str, bytes, str]:
    """16 unused bytes between the first and the second tensor (every later offset moved up)."""
    order = tensors_by_offset(header)
    cut = header[order[0]]["data_offsets"][1]
    for name in order[1:]:
        _shift(header[name], 16)
    return json.dumps(header), data[:cut] + b"\x7f" * 16 + data[cut:], order[1]


def _trailing(header: dict, data: bytes) -> tuple[str, bytes, str]:
    return json.dumps(header), data + b"\0" * 16, ""


def _metadata(value: object) -> Callable[[dict, bytes], tuple[str, bytes, str]]:
    def apply(header: dict, data: bytes) -> tuple[str, bytes, str]:
        header["__metadata__"] = value
        return json.dumps(header), data, ""

    return apply


# name -> (builder, words the error line must hold besides the file's path)
MALFORMATIONS: dict[str, tuple[Callable[[dict, bytes], tuple[str, bytes, str]], tuple[str, ...]]] = {
    "overlap": (_edit_second(_overlap), ("overlaps",)),
    "reversed-offsets": (_edit_second(_reversed), ("reversed data_offsets",)),
    "negative-offset": (_edit_second(_negative_offset), ("data_offsets",)),
    "size-not-dtype-x-shape": (_edit_second(_size_mismatch), ("bytes but",)),
    "negative-shape": (_edit_second(_negative_shape), ("invalid shape",)),
    "huge-shape": (_edit_second(_huge_shape), ("too large",)),
    "duplicate-key": (_duplicate_key, ("duplicate key",)),
    "gap": (_gap, ("16 bytes unused",)),
    "trailing-bytes": (_trailing, ("16 bytes after its last tensor",)),
    "metadata-list": (_metadata(["format", "pt"]), ("__metadata__",)),
    "metadata-string": (_metadata("pt"), ("__metadata__",)),
    "deep-nesting": (_deep, ("nested",)),
    "unknown-dtype": (_edit_second(_unknown_dtype), ("unknown dtype 'Q4_K'",)),
}


def break_file(path: Path, kind: str) -> tuple[str, ...]:
    """Rewrite ``path`` with malformation ``kind``; the words its error line must hold (path, tensor, fix)."""
    build, words = MALFORMATIONS[kind]
    header, data = split_file(path)
    text, data, tensor = build(header, data)
    join_file(path, text, data)
    return (str(path), *words, *((repr(tensor),) if tensor else ()), FIX)


# --- running the commands -----------------------------------------------------------------------------------------


def run_in_process(command: str, *args: str | os.PathLike, env: dict | None = None) -> Result:
    """As :func:`hostile.run_command`, in this process: a traceback that escapes ``main`` lands in ``err``."""
    from lorafuse.cli import main as lorafuse_main
    from lorafuse.cli.compat import merger_main

    main = {"lorafuse": lorafuse_main, "lora-merger": merger_main}[command]
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                err.write(traceback.format_exc())
                code = -1
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Result(code, out.getvalue(), err.getvalue())


FAST: dict[str, str] = {}  # the default merge: the prefill copies the base while the adapters are read
NO_PREFILL = {"LORAFUSE_PREFILL": "0"}


def _commands(base: Path, adapter: Path, outputs: Path) -> dict[str, tuple[str, list, dict]]:
    """Every command that reads the base or the adapter, writing (if at all) into the folder ``outputs``."""
    out = outputs / "merged"
    return {
        "merge": ("lorafuse", ["merge", base, adapter, "-o", out], FAST),
        "merge-no-prefill": ("lorafuse", ["merge", base, adapter, "-o", out], NO_PREFILL),
        "merge-verify": ("lorafuse", ["merge", base, adapter, "-o", out, "--verify"], FAST),
        "inspect-base": ("lorafuse", ["inspect", base], {}),
        "inspect-adapter": ("lorafuse", ["inspect", adapter], {}),
        "combine": ("lorafuse", ["combine", adapter, "-o", out], {}),
        "lora-merger": (
            "lora-merger",
            [
                "--source-model",
                base / BASE_FILE,
                "--lora-model",
                adapter / ADAPTER_FILE,
                "--output",
                outputs / "merged.safetensors",
            ],
            {},
        ),
    }


# Which commands read the broken file (inspect reads only what it is given; combine only the adapter).
BASE_COMMANDS = ("merge", "merge-no-prefill", "merge-verify", "inspect-base", "lora-merger")
ADAPTER_COMMANDS = ("merge", "merge-no-prefill", "merge-verify", "inspect-adapter", "combine", "lora-merger")
# One command per class as a real child process, rotating so that every command runs as one at least once.
_RUNS = [("base", c) for c in BASE_COMMANDS] + [("adapter", c) for c in ADAPTER_COMMANDS]
CHILD_RUNS = [(kind, *_RUNS[i % len(_RUNS)]) for i, kind in enumerate(MALFORMATIONS)]


def _scene(pristine: tuple[Path, Path], tmp_path: Path, which: str, kind: str):
    """Copies of the inputs with ``which`` ("base" or "adapter") broken: (base, adapter, outputs folder, words)."""
    base, adapter = shutil.copytree(pristine[0], tmp_path / "base"), shutil.copytree(pristine[1], tmp_path / "adapter")
    target = base / BASE_FILE if which == "base" else adapter / ADAPTER_FILE
    words = break_file(target, kind)
    (tmp_path / "outputs").mkdir()
    return base, adapter, tmp_path / "outputs", words


def _check_refused(result: Result, words: tuple[str, ...], before: dict, base: Path, adapter: Path) -> None:
    line = assert_refused(result, *words, code=1)
    assert "Traceback" not in result.out
    assert snapshot(base, adapter) == before, "an input changed"
    assert_no_litter(base.parent / "outputs")  # no half output, no hidden temporary folder
    assert len(line) < 400, line


@pytest.mark.parametrize("which", ["base", "adapter"])
@pytest.mark.parametrize("kind", list(MALFORMATIONS))
def test_every_command_refuses_the_header(pristine, tmp_path, kind, which):
    base, adapter, outputs, words = _scene(pristine, tmp_path, which, kind)
    before = snapshot(base, adapter)
    commands = _commands(base, adapter, outputs)
    for name in BASE_COMMANDS if which == "base" else ADAPTER_COMMANDS:
        command, args, env = commands[name]
        result = run_in_process(command, *args, env=env)
        try:
            _check_refused(result, words, before, base, adapter)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize(("kind", "which", "name"), CHILD_RUNS, ids=[f"{k}-{w}-{n}" for k, w, n in CHILD_RUNS])
def test_child_process_refuses_the_header(pristine, tmp_path, kind, which, name):
    base, adapter, outputs, words = _scene(pristine, tmp_path, which, kind)
    before = snapshot(base, adapter)
    command, args, env = _commands(base, adapter, outputs)[name]
    _check_refused(run_command(command, *args, env=env), words, before, base, adapter)


def test_the_pristine_inputs_pass_every_command(pristine, tmp_path):
    """The control: the same commands on the unbroken copies succeed, `merge` on the numpy kernel."""
    base, adapter = shutil.copytree(pristine[0], tmp_path / "base"), shutil.copytree(pristine[1], tmp_path / "adapter")
    before = snapshot(base, adapter)
    for name in _commands(base, adapter, tmp_path):
        outputs = tmp_path / f"out-{name}"
        outputs.mkdir()
        command, args, env = _commands(base, adapter, outputs)[name]
        result = run_in_process(command, *args, env=env)
        assert result.code == 0, f"{name}: {result.err}"
        if name == "merge":
            assert json.loads((outputs / "merged" / PROVENANCE_NAME).read_text())["engine"] == "numpy"
    assert snapshot(base, adapter) == before


# --- verify reads the merged output through the safetensors library -----------------------------------------------


@pytest.fixture()
def merged(pristine, tmp_path) -> Path:
    out = tmp_path / "merged"
    result = run_in_process("lorafuse", "merge", *pristine, "-o", out, env=FAST)
    assert result.code == 0, result.err
    return out


def test_verify_reads_the_output_through_the_library_not_the_merge_reader(pristine, merged, monkeypatch):
    import lorafuse.io.checkpoint as checkpoint

    own_reader = checkpoint.read_header

    def base_and_adapter_only(path):
        assert merged not in Path(path).parents, f"verify read the merged {path} with the merge's own reader"
        return own_reader(path)

    monkeypatch.setattr(checkpoint, "read_header", base_and_adapter_only)
    report = verify(merged, pristine[0], [pristine[1]], outputs=False)
    assert report.passed and report.tensors_checked == 4 and report.tensors_touched == 2


@pytest.mark.parametrize("kind", ["overlap", "trailing-bytes", "size-not-dtype-x-shape"])
def test_verify_refuses_an_output_the_library_refuses(pristine, merged, kind):
    target = merged / BASE_FILE
    break_file(target, kind)
    before = snapshot(*pristine, merged)
    args = ["verify", merged, "--base", pristine[0], "--adapter", pristine[1]]
    for result in (run_in_process("lorafuse", *args), run_command("lorafuse", *args)):
        assert_refused(result, str(target), "safetensors library", code=1)
        assert "PASSED" not in result.out
    assert snapshot(*pristine, merged) == before


# --- API level ----------------------------------------------------------------------------------------------------


def _raw_file(path: Path, header: dict, data: bytes = b"") -> Path:
    join_file(path, json.dumps(header), data)
    return path


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [([0, 2**62, 2**62], 0), ([2**64], 0), ([2**62, 4], 0), ([True, 4], 16), ([4.0], 16), ([-0.0], 0)],
)
def test_read_raw_header_refuses_shapes_torch_cannot_hold(tmp_path, shape, nbytes):
    path = _raw_file(tmp_path / "x.safetensors", {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}})
    with pytest.raises(InputError, match=r"tensor 't' has (a|an invalid) shape") as info:
        read_raw_header(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_raw_header_keeps_header_order_and_absolute_offsets(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]},
        "a": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [0, 4]},
        "empty": {"dtype": "U8", "shape": [0, 5], "data_offsets": [8, 8]},
    }
    path = _raw_file(tmp_path / "x.safetensors", header, bytes(8))
    entries, metadata = read_raw_header(path)
    start = 8 + len(json.dumps(header).encode())
    assert [(e.name, e.dtype, e.shape, e.offset - start, e.nbytes) for e in entries] == [
        ("b", "F16", (2,), 4, 4),
        ("a", "BF16", (1, 2), 0, 4),
        ("empty", "U8", (0, 5), 8, 0),
    ]
    assert metadata == {"format": "pt"}


@pytest.mark.parametrize(
    "blob", [b"", b"\x01", bytes(8), struct.pack("<Q", 10**9) + b"{}", struct.pack("<Q", 50) + b"{}"]
)
def test_read_raw_header_refuses_short_or_lying_length_prefixes(tmp_path, blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(LorafuseError, match="re-download or re-export it"):
        read_raw_header(path)
