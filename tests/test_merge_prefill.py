"""The CLI's prefill (io/prefill.py): the base copied into the output before torch is imported.

Whatever the prefill guessed, the merged files must be byte-identical to a merge without it, and a failed merge
must leave nothing behind.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import make_llama, make_peft_adapter

import lorafuse
import lorafuse.io.prefill as prefill_module
from lorafuse.cli import main
from lorafuse.engine import _BufferPool

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(llama_untied, tmp_path_factory) -> Path:
    return make_peft_adapter(llama_untied, tmp_path_factory.mktemp("pf") / "adapter", target_modules=ALL_LINEAR)


@pytest.fixture
def prefills(monkeypatch) -> list:
    """Every Prefill the CLI starts, recorded."""
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
def test_cli_merge_uses_prefill_and_matches_plain_merge(llama_untied, adapter, tmp_path, prefills, shard, monkeypatch):
    monkeypatch.setenv("LORAFUSE_FASTPATH", "0")  # the torch engine over the prefill (fastpath.py: test_fastpath.py)
    lorafuse.merge(llama_untied, [adapter], tmp_path / "plain", max_shard_size=shard)
    code = main(["merge", str(llama_untied), str(adapter), "-o", str(tmp_path / "cli"), "--max-shard-size", shard])
    assert code == 0
    assert len(prefills) == 1 and prefills[0] is not None and prefills[0].used
    plain, cli = _weight_bytes(tmp_path / "plain"), _weight_bytes(tmp_path / "cli")
    assert (len(cli) == 1) == (shard == "5GB")  # 60KB: several shards and their index
    assert cli == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli", "plain"]  # no temporary folder left


def test_prefill_with_another_layout_is_dropped(llama_untied, adapter, tmp_path):
    """A guess that does not match the engine's layout (here: other shard size) is removed, not used."""
    out = tmp_path / "merged"
    guess = prefill_module.speculate(llama_untied, out, "60KB", overwrite=False)
    assert guess is not None and len(guess.names) > 1
    try:
        lorafuse.merge(llama_untied, [adapter], out, prefill=guess)
    finally:
        guess.discard()
    assert not guess.used
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
    """The prefill only overlaps `import torch` if the CLI gets that far without importing it."""
    code = (
        "import sys; from lorafuse.cli import _load_commands, build_parser; _load_commands(); build_parser(); "
        "import lorafuse.io.prefill, lorafuse.sources.cli_args; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_extract_cli_formats_match_the_api():
    from lorafuse.extract import EXTRACT_FORMATS
    from lorafuse.extract_cli import EXTRACT_FORMATS as CLI_FORMATS

    assert CLI_FORMATS == EXTRACT_FORMATS


def test_buffer_pool_waits_for_its_budget():
    pool = _BufferPool(budget=100)
    first = pool.acquire(60)
    acquired = threading.Event()

    def second() -> None:
        pool.release(pool.acquire(60))
        acquired.set()

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.2)
    assert not acquired.is_set()  # 60 + 60 bytes would exceed the budget of 100
    pool.release(first)
    thread.join(5)
    assert acquired.is_set()
    big = pool.acquire(500)  # alone, a buffer may exceed the budget
    assert big.numel() >= 500 and big.dtype == torch.uint8
    pool.release(big)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_math_threads_write_the_same_bytes(llama_untied, adapter, tmp_path, monkeypatch, threads):
    """Several math threads finish tensors out of order; the files must not depend on it (CI has 2 cores: forced)."""
    monkeypatch.setenv("LORAFUSE_MATH_THREADS", "1")
    lorafuse.merge(llama_untied, [adapter], tmp_path / "one", max_shard_size="60KB")
    monkeypatch.setenv("LORAFUSE_MATH_THREADS", threads)
    code = main(["merge", str(llama_untied), str(adapter), "-o", str(tmp_path / "many"), "--max-shard-size", "60KB"])
    assert code == 0
    assert _weight_bytes(tmp_path / "many") == _weight_bytes(tmp_path / "one")
