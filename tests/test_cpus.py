"""CPU counting from affinity and cgroup quotas (cpus.py), on fake cgroup trees."""

from __future__ import annotations

import os

import pytest

from lorafuse import cpus


def _cgroup_v2(tmp_path, limits: dict[str, str]):
    root = tmp_path / "cgroup"
    for rel, value in limits.items():
        folder = root / rel
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/a/b\n")
    (root / "a" / "b").mkdir(parents=True, exist_ok=True)
    return root, proc


def test_v2_quota_is_the_tightest_on_the_way_up(tmp_path):
    root, proc = _cgroup_v2(tmp_path, {"a": "150000 100000", "a/b": "max 100000"})
    assert cpus.cgroup_cpu_limit(root, proc) == 1.5
    root, proc = _cgroup_v2(tmp_path / "2", {"a": "max 100000", "a/b": "50000 100000"})
    assert cpus.cgroup_cpu_limit(root, proc) == 0.5


def test_unlimited_v2_and_no_cgroup(tmp_path):
    root, proc = _cgroup_v2(tmp_path, {"a": "max 100000"})
    assert cpus.cgroup_cpu_limit(root, proc) is None
    assert cpus.cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None


def test_v1_cfs_quota(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "cpu.cfs_quota_us").write_text("250000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path, tmp_path / "missing") == 2.5
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


def test_usable_cpus_takes_quota_and_affinity(monkeypatch):
    monkeypatch.delenv("LORAFUSE_CPUS", raising=False)
    monkeypatch.setattr(cpus, "_affinity", lambda: 8)
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 1.2)
    assert cpus.usable_cpus() == 2
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    assert cpus.usable_cpus() == 8
    monkeypatch.setenv("LORAFUSE_CPUS", "3")
    assert cpus.usable_cpus() == 3


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_affinity_is_the_process_mask():
    assert cpus._affinity() == len(os.sched_getaffinity(0))
    assert cpus.affinity_mask() == set(os.sched_getaffinity(0))


def test_fixed_cpus_takes_positive_integers_only(monkeypatch):
    for value, expected in (("3", 3), ("0", None), ("-1", None), ("two", None), ("", None)):
        monkeypatch.setenv("LORAFUSE_CPUS", value)
        assert cpus.fixed_cpus() == expected, value


def test_calm_thread_pools_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cpus.calm_thread_pools()
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_cpu_times_reads_proc_stat():
    idle, total = cpus.cpu_times(None)
    assert 0 < idle <= total
