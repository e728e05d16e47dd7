"""The Ray executor on a local Ray cluster started here (2 CPUs, no dashboard): ``lorafuse batch --executor ray``
gives the bytes of the commands run one by one, fails a bad job alone, retries a job whose worker was killed; a
shard-parallel ``lorafuse merge --executor ray`` gives the bytes of the one-process merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from batch_helpers import (
    KillFirstWriter,
    make_adapters,
    manifest_jobs,
    no_litter,
    run_sequential,
    same_tree,
    write_manifest,
)

import lorafuse
from lorafuse.batch.runner import run_batch
from lorafuse.batch.shard_merge import ShardRun
from lorafuse.cli import main


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def adapters(llama_untied, tmp_path_factory) -> dict[str, Path]:
    return make_adapters(llama_untied, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def sequential(llama_untied, adapters, tmp_path_factory) -> Path:
    """The manifest's commands run one by one: the bytes every executor must give."""
    return run_sequential(llama_untied, adapters, tmp_path_factory.mktemp("sequential"))


def test_ray_batch_gives_the_commands_bytes_and_fails_a_bad_job_alone(llama_untied, adapters, sequential, tmp_path):
    bad = {"command": "merge", "id": "bad", "base": str(llama_untied), "adapters": [str(adapters["bad"])]}
    manifest = write_manifest(tmp_path, [*manifest_jobs(llama_untied, adapters, "out"), {**bad, "output": "out/bad"}])
    report = run_batch(manifest, "ray", retries=1, show_progress=False)
    status = {j.id: (j.status, j.attempts) for j in report.jobs}
    assert status == {"m-a": ("ok", 1), "m-ab": ("ok", 1), "x-a": ("ok", 1), "v-ab": ("ok", 1), "bad": ("failed", 2)}
    assert all("adapter_config.json" in e for e in report.failed[0].errors)
    for name in ("m-a", "m-ab", "x-a"):
        same_tree(tmp_path / "out" / name, sequential / name)
    assert not (tmp_path / "out" / "bad").exists()
    no_litter(tmp_path / "out")
    again = run_batch(manifest, "ray", retries=0, show_progress=False)
    assert [j.status for j in again.jobs] == ["skipped", "skipped", "skipped", "skipped", "failed"]


def test_killed_ray_worker_is_retried_and_its_output_is_complete(llama_untied, adapters, sequential, tmp_path):
    manifest = write_manifest(tmp_path, manifest_jobs(llama_untied, adapters, "out")[:1])
    killer = KillFirstWriter(tmp_path / "out" / "m-a")
    killer.start()
    try:
        report = run_batch(manifest, "ray", retries=2, show_progress=False)
    finally:
        killer.stop.set()
    assert killer.killed is not None, "the worker finished before it could be killed"
    entry = report.jobs[0]
    assert entry.status == "ok" and entry.attempts == 2 and "Ray worker died" in entry.errors[0], entry
    same_tree(tmp_path / "out" / "m-a", sequential / "m-a")
    no_litter(tmp_path / "out")


def test_ray_shard_parallel_merge_is_the_single_process_bytes(llama_untied, adapters, tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    args = dict(weights=[0.5, 1.5], max_shard_size="40KB", show_progress=False)
    lorafuse.merge(llama_untied, [adapters["a"], adapters["b"]], single, **args)
    report = lorafuse.merge(
        llama_untied, [adapters["a"], adapters["b"]], parallel, shard_run=ShardRun("ray", 2), **args
    )
    assert len(report.shard_sha256) > 2
    same_tree(parallel, single, also=("output",))
    cli = tmp_path / "cli"
    argv = ["merge", str(llama_untied), str(adapters["a"]), str(adapters["b"]), "--weight", "0.5", "1.5"]
    assert main([*argv, "--max-shard-size", "40KB", "-o", str(cli), "--executor", "ray", "-q"]) == 0
    same_tree(cli, single, also=("output",))
    no_litter(tmp_path)
