"""The merge pipeline's prefill (io/prefill.py): the base copied into the output while the adapters are read.

Every entry point gets it (the CLI and the API alike). Whatever the prefill guessed, the merged files must be
byte-identical to a merge without it, and a failed merge must leave nothing behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_llama, make_peft_adapter

import lorafuse
import lorafuse.io.prefill as prefill_module
from lorafuse.cli import main

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(llama_untied, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_untied, tmp_path_factory.mktemp("pf") / "adapter", target_modules=ALL_LINEAR)


@pytest.fixture
def prefills(monkeypatch) -> list:
    """Every Prefill a merge starts, recorded."""
    started: list = []
    original = prefill_module.speculate

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        started.append(result)
        return result

    monkeypatch.setattr(prefill_module, "speculate", recording)
    return started


def _weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}


@pytest.mark.parametrize("shard", ["5GB", "60KB"])
def test_cli_and_api_use_the_prefill_and_match_a_merge_without_it(
    llama_untied, adapter, tmp_path, prefills, shard, monkeypatch
):
    monkeypatch.setenv("LORAFUSE_PREFILL", "0")
    lorafuse.merge(llama_untied, [adapter], tmp_path / "plain", max_shard_size=shard)
    assert prefills == []
    monkeypatch.delenv("LORAFUSE_PREFILL")
    code = main(["merge", str(llama_untied), str(adapter), "-o", str(tmp_path / "cli"), "--max-shard-size", shard])
    assert code == 0
    lorafuse.merge(llama_untied, [adapter], tmp_path / "api", max_shard_size=shard)
    assert len(prefills) == 2 and all(p is not None and p.used for p in prefills)
    plain, cli, api = (_weight_bytes(tmp_path / name) for name in ("plain", "cli", "api"))
    assert (len(cli) == 1) == (shard == "5GB")  # 60KB: several shards and their index
    assert cli == plain == api
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api", "cli", "plain"]  # no temporary folder left


def test_prefill_with_another_layout_is_dropped(llama_untied, adapter, tmp_path, monkeypatch):
    """A guess that does not match the plan's layout (here: other shard size) is removed, not used."""
    guesses: list = []
    original = prefill_module.speculate

    def other_layout(base, output, max_shard_size, overwrite, inputs=(), on_copy=None):
        guesses.append(original(base, output, "60KB", overwrite, inputs, on_copy))
        return guesses[-1]

    monkeypatch.setattr(prefill_module, "speculate", other_layout)
    out = tmp_path / "merged"
    lorafuse.merge(llama_untied, [adapter], out)
    assert len(guesses) == 1 and guesses[0] is not None and len(guesses[0].names) > 1 and not guesses[0].used
    monkeypatch.undo()
    lorafuse.merge(llama_untied, [adapter], tmp_path / "plain")
    assert _weight_bytes(out) == _weight_bytes(tmp_path / "plain")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "plain").iterdir())


def test_failed_merge_after_prefill_leaves_nothing(llama_untied, models_root, tmp_path, prefills):
    wider = make_llama(models_root, name="llama-wide-prefill", hidden_size=48)
    wrong = make_peft_adapter(wider, tmp_path / "wrong", target_modules=["q_proj"])
    code = main(["merge", str(llama_untied), str(wrong), "-o", str(tmp_path / "out")])
    assert code == 1  # shape mismatch, found after the prefill started
    assert len(prefills) == 1 and prefills[0] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong"]


def test_no_prefill_where_it_cannot_apply(llama_untied, adapter, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert prefill_module.speculate(llama_untied, used, "5GB", overwrite=False) is None  # refused output
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    assert prefill_module.speculate(tmp_path / "missing", tmp_path / "o", "5GB", overwrite=False) is None
    assert prefill_module.speculate(adapter, tmp_path / "o", "5GB", overwrite=False) is None  # no model weights
    assert not (tmp_path / "o").exists()


def test_cli_starts_without_torch():
    """`import torch` costs a second or more: the CLI must not pay it to start (nor to merge, test_fastpath.py)."""
    code = (
        "import sys; from lorafuse.cli import build_parser; build_parser(); "
        "import lorafuse.io.prefill, lorafuse.sources.cli_args; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_extract_cli_formats_are_the_written_formats():
    from lorafuse.cli import build_parser
    from lorafuse.formats.registry import written_formats

    extract = build_parser()._subparsers._group_actions[0].choices["extract"]
    assert next(a for a in extract._actions if a.dest == "fmt").choices == written_formats()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_math_threads_write_the_same_bytes(llama_untied, adapter, tmp_path, monkeypatch, threads):
    """Several math threads finish tensors out of order; the files must not depend on it (CI has 2 cores: forced)."""
    monkeypatch.setenv("LORAFUSE_MATH_THREADS", "1")
    lorafuse.merge(llama_untied, [adapter], tmp_path / "one", max_shard_size="60KB")
    monkeypatch.setenv("LORAFUSE_MATH_THREADS", threads)
    code = main(["merge", str(llama_untied), str(adapter), "-o", str(tmp_path / "many"), "--max-shard-size", "60KB"])
    assert code == 0
    assert _weight_bytes(tmp_path / "many") == _weight_bytes(tmp_path / "one")
