"""Property-based fuzzing of weight index files (``*.safetensors.index.json``, issue 15 items 6 and 10).

Generated JSON structures, mutated valid indexes and random bytes are written as a model folder's index; each must
end in a correct result (the shards its ``weight_map`` names, all inside the folder) or a LorafuseError, never
another exception, never a hang and never a read outside the folder. The folder holds traps the index can name:
links out of it, a loop, a broken link, a sub-folder, a folder named like a shard; a decoy shard lies beside it.
Bounded and reproducible: a few seconds per test, ``derandomize=True``, no example database.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from lorafuse.errors import LorafuseError
from lorafuse.io import model_files

SETTINGS = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
INDEX = "model.safetensors.index.json"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-index")
    (root / "outside.safetensors").write_bytes(b"decoy: must never be listed or read")
    model = root / "model"
    (model / "sub").mkdir(parents=True)
    (model / "adir.safetensors").mkdir()
    for name in [*SHARDS, "sub/inner.safetensors", "pytorch_model.bin"]:
        (model / name).write_bytes(b"shard")
    (model / "config.json").write_text("{}")
    (model / "link-out.safetensors").symlink_to("../outside.safetensors")
    (model / "sub" / "up.safetensors").symlink_to("../../outside.safetensors")
    (model / "link-in.safetensors").symlink_to(SHARDS[0])
    (model / "loop.safetensors").symlink_to("loop.safetensors")
    (model / "broken.safetensors").symlink_to("gone.safetensors")
    (model / "outdir").symlink_to(root, target_is_directory=True)
    return model


# Values an index may name: valid shards, and every way out of the folder or into a trap.
NAMES = [
    *SHARDS,
    "./" + SHARDS[1],
    "sub/inner.safetensors",
    "sub/up.safetensors",
    "sub/../" + SHARDS[0],
    "sub/../../outside.safetensors",
    "../outside.safetensors",
    "outdir/outside.safetensors",
    "link-out.safetensors",
    "link-in.safetensors",
    "loop.safetensors",
    "broken.safetensors",
    "adir.safetensors",
    "missing.safetensors",
    "config.json",
    "pytorch_model.bin",
    "",
    " ",
    ".",
    "a\x00b.safetensors",
    "\ud800.safetensors",
    "x\n.safetensors",
    "a" * 300 + ".safetensors",
]


def absolute_decoy(folder: Path) -> str:
    return str(folder.parent / "outside.safetensors")


def note(outcome: str) -> None:
    """Count outcomes (pytest --hypothesis-show-statistics tells refusals from successes)."""
    if currently_in_test_context():
        event(outcome)


def check(folder: Path, raw: bytes) -> None:
    """Write ``raw`` as the folder's index and check what find_model_weights makes of it."""
    (folder / INDEX).write_bytes(raw)
    real_folder = Path(os.path.realpath(folder))
    opened: list[str] = []

    def spy(file, *args, **kwargs):  # every file the index reader opens
        opened.append(os.path.realpath(file))
        return builtins.open(file, *args, **kwargs)

    model_files.open = spy  # type: ignore[attr-defined]  # shadows the builtin inside the module only
    try:
        files, prefix, index = model_files.find_model_weights(folder)
    except LorafuseError as exc:
        assert "\n" not in str(exc), f"a message of several lines: {exc!r}"
        note(f"refused: {type(exc).__name__}")
        return
    finally:
        del model_files.open  # type: ignore[attr-defined]
        assert all(Path(p).is_relative_to(real_folder) for p in opened), f"read outside the folder: {opened}"
    note("listed the shards")
    assert index == folder / INDEX and prefix == "model"
    weight_map = json.loads(raw)["weight_map"]
    expected = list(dict.fromkeys(os.path.realpath(folder / name) for name in weight_map.values()))
    assert [os.path.realpath(f) for f in files] == expected
    for path in files:
        real = Path(os.path.realpath(path))
        assert real.is_file() and real.is_relative_to(real_folder), f"{path} leads outside the folder"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(NAMES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(
    st.one_of(
        json_values,
        st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(lambda m: {"metadata": {}, "weight_map": m}),
        json_values.map(lambda v: {"weight_map": v}),
    )
)
def test_generated_json_structures(folder, data):
    check(folder, json.dumps(data).encode())


@st.composite
def mutated_indexes(draw) -> bytes:
    """A valid-looking index whose entries name any of NAMES (or "{decoy}": the decoy's absolute path), then
    byte-level mutations."""
    tensors = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6, unique=True))
    choices = st.sampled_from(NAMES) | st.just("{decoy}") | st.text(max_size=16)
    weight_map = {t: draw(st.sampled_from(SHARDS) if draw(st.booleans()) else choices) for t in tensors}
    raw = bytearray(json.dumps({"metadata": {"total_size": 10}, "weight_map": weight_map}).encode())
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del raw[at:]
        else:
            raw[at:at] = draw(st.sampled_from([b"[", b"{", b"]", b"}", b",", b'"', b"\\", b"null", b"../", b"\x00"]))
    return bytes(raw)


@SETTINGS
@given(mutated_indexes())
def test_mutated_valid_indexes(folder, raw):
    check(folder, raw.replace(b"{decoy}", absolute_decoy(folder).encode()))


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes(folder, raw):
    check(folder, raw)


@settings(SETTINGS, max_examples=100)  # each example is up to 400 KB of brackets
@given(st.integers(1, 200_000), st.sampled_from(["[", '{"a":']), st.booleans())
def test_deeply_nested_json_is_an_error_not_a_recursion_error(folder, depth, opener, as_weight_map):
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    check(folder, ('{"weight_map": ' + nested + "}" if as_weight_map else nested).encode())


def test_a_valid_index_lists_its_shards_in_order(folder):
    """The property above is not vacuous: a plain index succeeds (with deduplicated, ordered shards)."""
    weight_map = {"a": SHARDS[1], "b": SHARDS[0], "c": "./" + SHARDS[1], "d": "sub/inner.safetensors"}
    raw = json.dumps({"weight_map": weight_map}).encode()
    check(folder, raw)
    files, _, _ = model_files.find_model_weights(folder)
    assert files == [folder / SHARDS[1], folder / SHARDS[0], folder / "sub/inner.safetensors"]
