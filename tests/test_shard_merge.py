"""``lorafuse merge --workers N``: each output shard written by a task of its own (local processes here; Ray in
test_batch_ray.py) gives the bytes of the one-process merge; what it cannot split is refused in one line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from batch_helpers import make_adapters, no_litter, same_tree
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.batch.shard_merge import ShardRun, file_sha256, pickle_plan
from lorafuse.cli import main
from lorafuse.errors import InputError, LorafuseError
from lorafuse.io.checkpoint import open_model
from lorafuse.plan import build_plan


@pytest.fixture(scope="module")
def adapters(llama_untied, tmp_path_factory) -> dict[str, Path]:
    return make_adapters(llama_untied, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def single(llama_untied, adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "merged"
    lorafuse.merge(llama_untied, [adapters["a"], adapters["b"]], out, weights=[0.5, 1.5], max_shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def test_local_shard_parallel_merge_is_the_single_process_bytes(llama_untied, adapters, single, tmp_path):
    out = tmp_path / "merged"
    report = lorafuse.merge(
        llama_untied,
        [adapters["a"], adapters["b"]],
        out,
        weights=[0.5, 1.5],
        max_shard_size="40KB",
        shard_run=ShardRun("local", 2),
    )
    same_tree(out, single, also=("output",))  # written elsewhere
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(report.shard_sha256) == shards
    assert all(report.shard_sha256[name] == file_sha256(out / name) for name in shards)
    assert json.loads((out / "lorafuse_merge.json").read_text())["shard_sha256"] == report.shard_sha256
    no_litter(tmp_path)


def test_cli_workers_flag(llama_untied, adapters, single, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", str(llama_untied), str(adapters["a"]), str(adapters["b"]), "--weight", "0.5", "1.5"]
    assert main([*argv, "--max-shard-size", "40KB", "-o", str(out), "--workers", "3", "-q"]) == 0
    same_tree(out, single, also=("output",))  # written elsewhere
    assert main([*argv, "-o", str(tmp_path / "x"), "--workers", "0"]) == 1
    assert "--workers 0: give a positive number" in capsys.readouterr().err
    assert main([*argv, "-o", str(tmp_path / "x"), "--address", "10.0.0.1:6379"]) == 1
    assert "--address names a Ray cluster" in capsys.readouterr().err


def test_what_cannot_be_split_is_refused(llama_untied, adapters, tmp_path):
    single_file = tmp_path / "base.safetensors"
    single_file.write_bytes((llama_untied / "model.safetensors").read_bytes())
    for base, output, kwargs, why in [
        (single_file, tmp_path / "o.safetensors", {}, "not a single-file output"),
        (llama_untied, tmp_path / "o1", {"out_format": "bin"}, "not a GGUF or .bin output"),
    ]:
        with pytest.raises(LorafuseError, match=why):
            lorafuse.merge(
                base, [adapters["a"]], output, shard_run=ShardRun("local", 2), conv1d_modules="none", **kwargs
            )
        assert not output.exists()
    no_litter(tmp_path)


def test_failed_shard_publishes_nothing(llama_untied, adapters, tmp_path, monkeypatch):
    """A task that fails every attempt (here: the base changed under the plan) leaves no output."""
    import lorafuse.batch.shard_merge as shard_merge

    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        (base / name).write_bytes((llama_untied / name).read_bytes())
    real = shard_merge.pickle_plan

    def change_base_after_planning(plan):
        data = real(plan)
        tensors = load_file(base / "model.safetensors")
        tensors["extra.weight"] = next(iter(tensors.values()))[:1].copy()
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
        return data

    monkeypatch.setattr(shard_merge, "pickle_plan", change_base_after_planning)
    with pytest.raises(LorafuseError, match="does not hold the tensors the plan was made from.*shared filesystem"):
        lorafuse.merge(base, [adapters["a"]], tmp_path / "out", shard_run=ShardRun("local", 1), show_progress=False)
    assert not (tmp_path / "out").exists()
    no_litter(tmp_path)


def test_a_pickled_plan_reopens_its_files_and_checks_them(llama_untied, adapters, tmp_path):
    from lorafuse.formats import read_adapter

    checkpoint, _, _ = open_model(llama_untied)
    shapes = {n: i.shape for n, i in checkpoint.infos.items()}
    plan = build_plan(checkpoint, [read_adapter(adapters["a"], base_shapes=shapes)], None, None)
    again = pickle.loads(pickle_plan(plan))
    assert again.base is not plan.base and again.base.infos.keys() == plan.base.infos.keys()
    assert all(Path(i.path).is_absolute() for i in again.base.infos.values())
    name = plan.touched[0].source
    assert (again.base.array(name) == plan.base.array(name)).all()
    data = pickle_plan(plan)
    moved = tmp_path / "moved"
    (llama_untied).rename(moved)
    try:
        with pytest.raises(InputError, match="does not exist"):
            pickle.loads(data)
    finally:
        moved.rename(llama_untied)
    again.base.close()
    checkpoint.close()
