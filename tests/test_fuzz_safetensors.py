"""Property-based fuzzing (Hypothesis) of what lorafuse parses from safetensors files.

Headers: generated valid files, the same files mutated (bytes, JSON fields, offsets, shapes, dtypes, the length
prefix, the data section) and random bytes go to :func:`read_raw_header`. Each ends in a result or a
:class:`LorafuseError`, never another exception and never a hang; the safetensors library is the oracle: what
lorafuse accepts, ``safetensors`` accepts with the same names, dtypes, shapes and tensor bytes (so no byte range
reaches outside the file or into another tensor), and what lorafuse refuses while the library accepts is one of
the few things refused on purpose (duplicate keys, deep nesting, a dtype written as an object, absurd sizes).

Single-file adapters: generated kohya / diffusion / plain key sets (``lora_up``/``lora_down``/``alpha``/``diff``/...
with fitting or random shapes and values) are detected and merged into a tiny base: each ends in a
:class:`LorafuseError` or in a merged model equal to base + the LoRA products computed here.

Runs are reproducible (``derandomize=True``, no example database) and bounded (about 30 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import random
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import deserialize, safe_open
from safetensors.torch import load_file, save_file

from lorafuse.errors import LorafuseError
from lorafuse.formats import detect_format
from lorafuse.io.checkpoint import Checkpoint
from lorafuse.io.safetensors_header import DTYPE_BITS, read_raw_header
from lorafuse.merger import merge

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# What lorafuse refuses on purpose although the library reads it (see io/safetensors_header.py).
STRICTER = ("duplicate key", "nested more than", "unknown dtype {", "too large for any tensor")
SECONDS_PER_INPUT = 20


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when one input takes longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"one fuzzed input took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lorafuse-fuzz-") as folder:
        yield Path(folder)


# --- safetensors headers ------------------------------------------------------------------------------------------

tensor_names = st.text(st.characters(codec="utf-8"), max_size=12).filter(lambda s: s != "__metadata__")
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 2**63, 2**64 - 1, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


@st.composite
def valid_headers(draw) -> tuple[dict, bytes]:
    """A valid header (as a dict, keys in file order) and its data section."""
    names = draw(st.lists(tensor_names, max_size=6, unique=True))
    entries = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        if _numel(shape) * DTYPE_BITS[dtype] % 8:
            shape.append(8)  # sub-byte dtypes (F4, F6_*) need a whole number of bytes
        entries[name] = {"dtype": dtype, "shape": shape}
    start = 0
    for name in draw(st.permutations(names)):  # the data in any order, contiguous
        size = _numel(entries[name]["shape"]) * DTYPE_BITS[entries[name]["dtype"]] // 8
        entries[name]["data_offsets"] = [start, start + size]
        start += size
    header: dict = dict(entries)
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    if metadata is not None or draw(st.booleans()):
        header = {"__metadata__": metadata, **header} if draw(st.booleans()) else {**header, "__metadata__": metadata}
    # Distinct bytes per position, so that a range read from the wrong place shows.
    return header, random.Random(draw(st.integers(0, 2**32))).randbytes(start)


def encode(header: dict, data: bytes, ascii_only: bool = True, padding: int = 0) -> bytes:
    raw = json.dumps(header, ensure_ascii=ascii_only).encode() + b" " * padding
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def valid_files(draw) -> bytes:
    header, data = draw(valid_headers())
    return encode(header, data, draw(st.booleans()), draw(st.integers(0, 7)))


def _library_view(path: Path, blob: bytes) -> tuple[dict, dict] | None:
    """(name -> (dtype, shape, data bytes), metadata) as the safetensors library reads the file; None: refused."""
    try:
        tensors = {name: (t["dtype"], tuple(t["shape"]), bytes(t["data"])) for name, t in deserialize(blob)}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # SafetensorError and friends: every refusal of the library
        return None
    return tensors, metadata


def check_header(path: Path, blob: bytes) -> bool:
    """The property for one file; True when lorafuse accepted it."""
    path.write_bytes(blob)
    with time_limit(SECONDS_PER_INPUT):
        return _check_header(path, blob)


def _check_header(path: Path, blob: bytes) -> bool:
    try:
        entries, metadata = read_raw_header(path)
    except LorafuseError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, message
        library = _library_view(path, blob)
        if library is not None:
            assert any(word in message for word in STRICTER), f"refused what safetensors reads: {message}"
        event("refused" + (" (library reads it)" if library is not None else ""))
        return False
    event("accepted")
    library = _library_view(path, blob)
    assert library is not None, "lorafuse accepted a file the safetensors library refuses"
    tensors, library_metadata = library
    assert metadata == library_metadata
    data_start = 8 + struct.unpack("<Q", blob[:8])[0]
    assert {e.name for e in entries} == set(tensors) and len(entries) == len(tensors)
    for e in entries:
        assert data_start <= e.offset and e.offset + e.nbytes <= len(blob), "a byte range outside the data section"
        assert (e.dtype, e.shape, blob[e.offset : e.offset + e.nbytes]) == tensors[e.name], e.name
    _check_reader(path, tensors)
    return True


def _check_reader(path: Path, tensors: dict) -> None:
    """lorafuse's reader (Checkpoint) reads exactly each tensor's bytes, or refuses a dtype it cannot hold."""
    try:
        checkpoint = Checkpoint([path])
    except LorafuseError as exc:
        assert "cannot read" in str(exc), exc  # F4, F6_*, C64, ...: no numpy dtype of lorafuse's
        return
    with checkpoint:
        for name in checkpoint.keys():
            assert checkpoint.array(name).tobytes() == tensors[name][2], name


def _mutate_bytes(data, blob: bytes) -> bytes:
    """Replace, insert or delete a few bytes, mostly in the length prefix and the header."""
    blob = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        limit = len(blob) if data.draw(st.booleans()) else min(len(blob), 8 + 96)
        at = data.draw(st.integers(0, max(0, limit - 1)))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set" and blob:
            blob[at] = data.draw(st.sampled_from(b'{}[]",:0123456789-. \\e\x00\xff'))
        elif op == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif blob:
            del blob[at : at + data.draw(st.integers(1, 4))]
    return bytes(blob)


def _mutate_json(data, header: dict, payload: bytes) -> bytes:
    """Change one field of one entry (or the metadata, the length prefix or the data section)."""
    names = [k for k in header if k != "__metadata__"]
    choice = data.draw(st.sampled_from(["field", "drop", "extra", "metadata", "duplicate", "data", "prefix", "deep"]))
    if choice in ("field", "drop", "extra") and names:
        entry = header[data.draw(st.sampled_from(names))]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if choice == "drop":
            del entry[field]
        elif choice == "extra":
            entry[data.draw(st.text(max_size=5))] = data.draw(json_values)
        elif field == "dtype":
            entry[field] = data.draw(st.sampled_from(sorted(DTYPE_BITS)) | st.text(max_size=5) | json_values)
        elif field == "shape":
            entry[field] = data.draw(st.lists(st.integers(-3, 9) | st.sampled_from([2**32, 2**63, 2**64]), max_size=4))
        else:
            start, end = entry[field]
            delta = data.draw(st.integers(-9, 9))
            entry[field] = data.draw(
                st.sampled_from(
                    [[start + delta, end], [start, end + delta], [end, start], [start + delta, end + delta]]
                )
                | st.lists(st.integers(-(2**65), 2**65), max_size=3)
            )
    elif choice == "metadata":
        header["__metadata__"] = data.draw(json_values)
    elif choice == "duplicate" and names:
        name, other = data.draw(st.sampled_from(names)), data.draw(st.sampled_from(names))
        text = json.dumps(header)
        extra = json.dumps({name: header[other]})[1:-1]
        raw = (text[:-1] + ", " + extra + "}").encode()
        return struct.pack("<Q", len(raw)) + raw + payload
    elif choice == "data":
        cut = data.draw(st.integers(-8, 8))
        payload = payload[:cut] if cut < 0 else payload + bytes(cut)
    elif choice == "deep":
        depth = data.draw(st.integers(60, 3000))
        raw = json.dumps({**header, "__deep__": "NEST"}).replace('"NEST"', "[" * depth + "]" * depth).encode()
        return struct.pack("<Q", len(raw)) + raw + payload
    blob = encode(header, payload)
    if choice == "prefix":
        n = struct.unpack("<Q", blob[:8])[0]
        n = data.draw(st.sampled_from([n - 1, n + 1, 0, 2**64 - 1, 100_000_001, len(blob)]))
        blob = struct.pack("<Q", max(0, n)) + blob[8:]
    return blob


@settings(FUZZ, max_examples=400)
@given(valid_files())
def test_valid_files_are_read_as_the_library_reads_them(workdir, blob):
    assert check_header(workdir / "valid.safetensors", blob), "refused a valid file"


@settings(FUZZ, max_examples=1200)
@given(valid_files(), st.data())
def test_mutated_bytes_end_in_a_result_or_a_lorafuse_error(workdir, blob, data):
    check_header(workdir / "bytes.safetensors", _mutate_bytes(data, blob))


@settings(FUZZ, max_examples=1200)
@given(valid_headers(), st.data())
def test_mutated_fields_end_in_a_result_or_a_lorafuse_error(workdir, valid, data):
    header, payload = valid
    check_header(workdir / "fields.safetensors", _mutate_json(data, header, payload))


@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=64) | st.builds(lambda v: json.dumps(v).encode(), json_values), st.booleans())
def test_random_bytes_end_in_a_result_or_a_lorafuse_error(workdir, body, prefixed):
    blob = struct.pack("<Q", len(body)) + body if prefixed else body
    check_header(workdir / "random.safetensors", blob)


# --- single-file adapters (kohya, diffusion, plain) ---------------------------------------------------------------

BASE_SHAPES = {
    "down_blocks.0.attn.to_q.weight": (6, 4),
    "down_blocks.0.attn.to_q.bias": (6,),
    "down_blocks.0.conv.weight": (4, 2, 3, 3),
    "blocks.0.modulation": (1, 2, 4),
    "proj_out.weight": (4, 6),
}
MODULES = ["down_blocks.0.attn.to_q", "down_blocks.0.conv", "blocks.0", "proj_out", "missing.module"]
STYLES = {  # how each format names a module, and its slot suffixes
    "kohya": (lambda m: "lora_unet_" + m.replace(".", "_"), ["lora_up.weight", "lora_down.weight", "alpha", "diff"]),
    "diffusion": (lambda m: "diffusion_model." + m, ["lora_up.weight", "lora_down.weight", "alpha", "diff", "diff_b"]),
    "plain": (lambda m: m, ["lora_B.weight", "lora_A.weight", "alpha"]),
}
EXTRA_SUFFIXES = ["diff_m", "dora_scale", "lora_mid.weight", "weight"]
SLOT_OF = {"lora_up.weight": "up", "lora_B.weight": "up", "lora_down.weight": "down", "lora_A.weight": "down"}
DIFF_TARGET = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}


def _fitting_shape(module: str, suffix: str, rank: int) -> tuple[int, ...]:
    weight = BASE_SHAPES.get(f"{module}.weight")
    slot = SLOT_OF.get(suffix)
    if suffix == "alpha":
        return ()
    if suffix in DIFF_TARGET:
        return BASE_SHAPES.get(f"{module}.{DIFF_TARGET[suffix]}", (3,))
    if weight is None or slot is None:
        return (rank, 3)
    if slot == "down":
        return (rank, *weight[1:])
    return (weight[0], rank, *([1] * (len(weight) - 2)))


def _slot_sets(suffixes: list[str]) -> st.SearchStrategy[list[str]]:
    """Mostly complete LoRA pairs (with or without alpha) and differences; sometimes any subset of the slots."""
    up, down, *rest = suffixes
    diffs = [s for s in rest if s.startswith("diff")]
    complete = st.sampled_from([[up, down], [up, down, "alpha"]])
    some_diffs = st.lists(st.sampled_from(diffs), min_size=1, unique=True) if diffs else complete
    anything = st.lists(st.sampled_from(suffixes + EXTRA_SUFFIXES), min_size=1, max_size=4, unique=True)
    return st.one_of(complete, complete, complete, some_diffs, anything)


@st.composite
def adapter_files(draw) -> dict[str, torch.Tensor]:
    """A kohya / diffusion / plain key set: fitting shapes mostly, random ones and odd keys sometimes."""
    namer, suffixes = STYLES[draw(st.sampled_from(sorted(STYLES)))]
    tensors: dict[str, torch.Tensor] = {}
    modules = st.sampled_from(MODULES[:1] * 3 + MODULES[3:4] * 3 + MODULES)
    for module in draw(st.lists(modules, min_size=1, max_size=3, unique=True)):
        rank = draw(st.sampled_from([1, 2, 3, 1, 2, 3, 0]))
        for suffix in draw(_slot_sets(suffixes)):
            shape = _fitting_shape(module, suffix, rank)
            if draw(st.integers(0, 19)) == 10:  # not 0: Hypothesis draws the bounds often
                shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
            dtype = draw(st.sampled_from([torch.float32] * 9 + [torch.float16, torch.bfloat16, torch.int32]))
            values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) * 0.3
            if suffix == "alpha":
                values = torch.full(shape, float(draw(st.sampled_from([1, 2, 4, 0.5, 0, -1]))))
            if values.numel() and draw(st.integers(0, 29)) == 10:
                values.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            tensors[f"{namer(module)}.{suffix}"] = values.to(dtype)
    if draw(st.integers(0, 19)) == 10:
        tensors[draw(st.text(max_size=10))] = torch.ones(2)  # a key no format knows
    return tensors


@pytest.fixture(scope="module")
def tiny_base(workdir) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in BASE_SHAPES.items()}
    folder = workdir / "base"
    folder.mkdir()
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return folder, tensors


def expected_merge(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Base + every LoRA product and difference, computed here in fp64; None when a conv layout is involved."""
    out = {name: t.double() for name, t in base.items()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        for suffix in sorted([*SLOT_OF, "alpha", *DIFF_TARGET], key=len, reverse=True):
            if key.endswith("." + suffix):
                groups.setdefault(key[: -len(suffix) - 1], {})[SLOT_OF.get(suffix, suffix)] = value.double()
                break
    for name, slots in groups.items():
        module = next(m for m in MODULES if name.endswith((m, m.replace(".", "_"))))
        for slot, attr in DIFF_TARGET.items():
            if slot in slots:
                out[f"{module}.{attr}"] = out[f"{module}.{attr}"] + slots[slot]
        if "up" in slots:
            up, down = slots["up"], slots["down"]
            if up.dim() != 2 or out[f"{module}.weight"].dim() != 2:
                return None
            scale = float(slots["alpha"].reshape(-1)[0]) / down.shape[0] if "alpha" in slots else 1.0
            out[f"{module}.weight"] = out[f"{module}.weight"] + scale * (up @ down)
    return out


@settings(FUZZ, max_examples=250)
@given(adapter_files())
def test_single_file_adapters_merge_correctly_or_are_refused(workdir, tiny_base, lora):
    base, base_tensors = tiny_base
    path, out = workdir / "adapter.safetensors", workdir / "merged"
    save_file(lora, path)
    with time_limit(SECONDS_PER_INPUT):
        try:
            detect_format(path)
            merge(base, [path], out, overwrite=True, show_progress=False)
        except LorafuseError as exc:
            assert "\n" not in str(exc), str(exc)
            event(f"refused: {type(exc).__name__}")
            return
    merged = load_file(out / "diffusion_pytorch_model.safetensors")
    expected = expected_merge(base_tensors, lora)
    assert set(merged) == set(base_tensors)
    event("merged" + (" (conv layout: values not recomputed here)" if expected is None else ""))
    if expected is not None:
        for name, value in expected.items():
            assert torch.allclose(merged[name].double(), value, rtol=1e-5, atol=1e-5), name
