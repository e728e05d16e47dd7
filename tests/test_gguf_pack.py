"""gguf_pack's writer writes the same header bytes as gguf-py's own GGUFWriter."""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")

from lorafuse.gguf_pack import new_writer  # noqa: E402


def _header(writer, path) -> bytes:
    writer.add_string("general.name", "tiny")
    writer.add_token_list(["<s>", "é", b"\xff\xfe", "a" * 300])  # str, non-ASCII, raw bytes, long
    writer.add_token_scores([0.0, -1.5, 3.25, 1e-30])
    writer.add_token_types([1, 3, 6, 1])
    writer.add_array("test.ints", [0, -1, 2**31 - 1])
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.mixed", [1, 2.5])  # gguf-py's own error path
    writer.add_uint32("test.one", 7)
    writer.write_header_to_file(path=path)
    try:
        writer.write_kv_data_to_file()
    except ValueError as exc:
        return str(exc).encode()
    writer.close()
    return path.read_bytes()


def test_same_bytes_as_gguf_py(tmp_path):
    ours = _header(new_writer("llama"), tmp_path / "ours.gguf")
    theirs = _header(gguf.GGUFWriter(path=None, arch="llama"), tmp_path / "theirs.gguf")
    assert ours == theirs and b"same type" in ours  # the mixed array is refused by both, with gguf-py's words


def test_same_bytes_without_the_mixed_array(tmp_path):
    def header(writer, path):
        writer.add_token_list([f"tok{i}" for i in range(1000)])
        writer.add_token_scores([float(i) / 7 for i in range(1000)])
        writer.add_array("test.bools", [bool(i % 2) for i in range(5)])
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.close()
        return path.read_bytes()

    assert header(new_writer("qwen3"), tmp_path / "a.gguf") == header(
        gguf.GGUFWriter(None, "qwen3"), tmp_path / "b.gguf"
    )
