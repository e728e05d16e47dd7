"""``lorafuse batch`` on the local executor: a manifest of merges, an extract and a verify gives the bytes of the same
commands run one by one; a bad job fails alone after its retries; a killed worker's job is retried and its output
is complete; a re-run skips what is done and redoes what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_helpers import (
    KillFirstWriter,
    make_adapters,
    manifest_jobs,
    no_litter,
    run_sequential,
    same_tree,
    write_manifest,
)

from lorafuse.batch.manifest import load_manifest
from lorafuse.batch.runner import run_batch
from lorafuse.cli import main
from lorafuse.errors import InputError


@pytest.fixture(scope="module")
def adapters(llama_untied, tmp_path_factory) -> dict[str, Path]:
    return make_adapters(llama_untied, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def sequential(llama_untied, adapters, tmp_path_factory) -> Path:
    """The manifest's commands run one by one: the bytes every executor must give."""
    return run_sequential(llama_untied, adapters, tmp_path_factory.mktemp("sequential"))


def test_local_batch_gives_the_commands_bytes_and_fails_a_bad_job_alone(llama_untied, adapters, sequential, tmp_path):
    jobs = manifest_jobs(llama_untied, adapters, "out")
    bad = {"command": "merge", "id": "bad", "base": str(llama_untied), "adapters": [str(adapters["bad"])]}
    manifest = write_manifest(tmp_path, [*jobs, {**bad, "output": "out/bad"}])
    report = run_batch(manifest, "local", workers=2, retries=1, show_progress=False)
    status = {j.id: (j.status, j.attempts) for j in report.jobs}
    assert status == {"m-a": ("ok", 1), "m-ab": ("ok", 1), "x-a": ("ok", 1), "v-ab": ("ok", 1), "bad": ("failed", 2)}
    failed = report.failed[0]
    assert len(failed.errors) == 2 and all("adapter_config.json" in e and "\n" not in e for e in failed.errors)
    for name in ("m-a", "m-ab", "x-a"):
        same_tree(tmp_path / "out" / name, sequential / name)
    assert not (tmp_path / "out" / "bad").exists()
    no_litter(tmp_path / "out")
    assert next(j for j in report.jobs if j.id == "v-ab").result["report"]["passed"] is True
    saved = json.loads((tmp_path / "jobs.report.json").read_text())
    assert [j["status"] for j in saved["jobs"]] == ["ok", "ok", "ok", "ok", "failed"]

    # A re-run skips what is done; a changed adapter redoes its merges and what reads their outputs.
    again = run_batch(manifest, "local", workers=2, retries=0, show_progress=False)
    assert {j.id: j.status for j in again.jobs} == {
        "m-a": "skipped", "m-ab": "skipped", "x-a": "skipped", "v-ab": "skipped", "bad": "failed",
    }  # fmt: skip
    config = adapters["b"] / "adapter_config.json"
    config.write_text(config.read_text())  # same bytes, a new mtime: the inputs' state changed
    third = run_batch(manifest, "local", workers=2, retries=0, show_progress=False)
    assert {j.id: j.status for j in third.jobs} == {
        "m-a": "skipped", "m-ab": "ok", "x-a": "skipped", "v-ab": "ok", "bad": "failed",
    }  # fmt: skip
    same_tree(tmp_path / "out" / "m-ab", sequential / "m-ab")


def test_killed_worker_is_retried_and_its_output_is_complete(llama_untied, adapters, sequential, tmp_path):
    jobs = manifest_jobs(llama_untied, adapters, "out")[:1]
    manifest = write_manifest(tmp_path, jobs)
    killer = KillFirstWriter(tmp_path / "out" / "m-a")
    killer.start()
    try:
        report = run_batch(manifest, "local", workers=1, retries=2, show_progress=False)
    finally:
        killer.stop.set()
    assert killer.killed is not None, "the worker finished before it could be killed"
    entry = report.jobs[0]
    assert entry.status == "ok" and entry.attempts == 2, entry
    assert "died" in entry.errors[0] and "-9" in entry.errors[0]
    same_tree(tmp_path / "out" / "m-a", sequential / "m-a")
    no_litter(tmp_path / "out")  # the killed attempt's temporary was removed by its retry


def test_killed_worker_without_retries_leaves_no_output(llama_untied, adapters, tmp_path):
    manifest = write_manifest(tmp_path, manifest_jobs(llama_untied, adapters, "out")[:1])
    killer = KillFirstWriter(tmp_path / "out" / "m-a")
    killer.start()
    try:
        report = run_batch(manifest, "local", workers=1, retries=0, show_progress=False)
    finally:
        killer.stop.set()
    assert killer.killed is not None and report.jobs[0].status == "failed"
    assert not (tmp_path / "out" / "m-a").exists()


def test_manifest_keys_go_through_the_commands_parsers(llama_untied, adapters, tmp_path):
    job = {"command": "merge", "base": str(llama_untied), "adapters": [str(adapters["a"])], "output": "o"}
    with pytest.raises(InputError, match=r"job 1 \(merge-1\): .*no option 'max_shard'"):
        load_manifest(write_manifest(tmp_path / "1", [{**job, "max_shard": "1GB"}]))
    with pytest.raises(InputError, match=r"job 1 \(merge-1\): argument --format/--out-format: invalid choice: 'nope'"):
        load_manifest(write_manifest(tmp_path / "2", [{**job, "format": "nope"}], {}))
    with pytest.raises(InputError, match="give 'command'"):
        load_manifest(write_manifest(tmp_path / "3", [{"base": "x"}]))
    with pytest.raises(InputError, match="two jobs write"):
        load_manifest(write_manifest(tmp_path / "4", [job, {**job, "id": "other"}]))
    (tmp_path / "5").mkdir()
    broken = tmp_path / "5" / "jobs.json"
    broken.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_manifest(broken)
    jobs = load_manifest(write_manifest(tmp_path / "6", [{**job, "allow-unmatched": True, "weight": 0.5}]))
    assert jobs[0].argv == ("--max-shard-size=60KB", "--output=o", "--allow-unmatched", "--weight=0.5", "--",
                            str(llama_untied), str(adapters["a"]))  # fmt: skip


def test_yaml_manifest_and_cli(llama_untied, adapters, tmp_path, capsys):
    import yaml  # PyYAML: a dependency of transformers (the test extra)

    jobs = manifest_jobs(llama_untied, adapters, "out")[:1]
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump({"jobs": jobs}))
    assert main(["batch", str(path), "--workers", "1", "-q"]) == 0
    table = capsys.readouterr().out
    assert "m-a" in table and "1 done, 0 skipped (done before), 0 failed" in table
    assert main(["batch", str(path), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"][0]["status"] == "skipped"


def test_ray_executor_without_ray_is_one_line(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from lorafuse.batch.executors import make_executor
    from lorafuse.errors import LorafuseError

    with pytest.raises(LorafuseError, match=r"pip install 'lorafuse\[ray\]'"):
        make_executor("ray", None)


def test_a_job_reading_a_failed_jobs_output_is_not_run(llama_untied, adapters, tmp_path):
    bad = str(adapters["bad"])
    jobs = [
        {"command": "verify", "id": "v", "merged": "out/bad", "base": str(llama_untied), "adapter": [bad]},
        {"command": "merge", "id": "bad", "base": str(llama_untied), "adapters": [bad], "output": "out/bad"},
    ]
    manifest = write_manifest(tmp_path, jobs, {"dtype": "bf16", "no_output_check": True})
    loaded = {job.id: job.argv for job in load_manifest(manifest)}
    assert "--dtype=bf16" in loaded["bad"] and "--no-output-check" in loaded["v"]
    assert "--dtype=bf16" not in loaded["v"]  # verify has no --dtype: a shared default goes where it applies
    report = run_batch(manifest, "local", workers=2, retries=0, show_progress=False)
    by_id = {j.id: j for j in report.jobs}
    assert by_id["bad"].status == "failed" and by_id["bad"].attempts == 1
    assert by_id["v"].status == "failed" and by_id["v"].errors == ["not run: job bad, which writes its input, failed"]


def test_yaml_manifest_without_pyyaml_is_one_line(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):
        if name == "yaml":
            raise ImportError("no yaml")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    path = tmp_path / "jobs.yml"
    path.write_text("jobs: []\n")
    with pytest.raises(InputError, match=r"is YAML, which needs PyYAML: pip install pyyaml, or write the manifest"):
        load_manifest(path)
