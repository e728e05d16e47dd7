"""How many CPUs this process may really use, and thread pools that do not spin on them.

``os.cpu_count()`` is the host's count: inside a container with a CPU quota, or under ``taskset``, lorafuse would
start more threads than it can run, and OpenMP / BLAS threads that busy-wait between small operations then burn
the CPU time a competing process needs (measured: ``lorafuse extract`` beside one busy process took 3.4x as long
with default threads as with one).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Variables read by the thread pools of numpy's BLAS (OpenBLAS, MKL) and torch's OpenMP when they load.
POOL_SIZE_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def affinity_mask() -> set[int] | None:
    """The CPUs this process may run on, or None where the platform cannot say (not Linux)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _affinity() -> int:
    mask = affinity_mask()
    return len(mask) if mask else (os.cpu_count() or 1)


def fixed_cpus() -> int | None:
    """The CPU count ``LORAFUSE_CPUS`` fixes (a positive integer), or None when it is unset or not one."""
    value = os.environ.get("LORAFUSE_CPUS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _cgroup_v2_limit(root: Path, proc_cgroup: Path) -> float | None:
    """The tightest ``cpu.max`` quota on the way from this process's cgroup up to the root, in CPUs."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    folder = root / relative.lstrip("/")
    limits: list[float] = []
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max" and float(period) > 0:
                limits.append(float(quota) / float(period))
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(limits) if limits else None


def _cgroup_v1_limit(root: Path) -> float | None:
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            return quota / period
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max`` or v1 CFS quota) in CPUs, or None when unlimited."""
    limit = _cgroup_v2_limit(root, proc_cgroup)
    return limit if limit is not None else _cgroup_v1_limit(root)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (rounded up), at least 1.

    ``LORAFUSE_CPUS`` overrides (a positive integer).
    """
    fixed = fixed_cpus()
    if fixed is not None:
        return fixed
    cpus = _affinity()
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def calm_thread_pools() -> None:
    """Size numpy's and torch's thread pools to :func:`usable_cpus` and stop OpenMP threads from spinning.

    Must run before numpy or torch is imported (the pools read these variables when they load); a variable the
    user set is kept. Passive waiting costs a few microseconds per parallel region, and saves the whole CPU a
    spinning thread takes from any other process on the machine.
    """
    cpus = str(usable_cpus())
    for var in POOL_SIZE_VARS:
        os.environ.setdefault(var, cpus)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_times(cpus: set[int] | None) -> tuple[float, float]:
    """(idle, total) jiffies summed over ``cpus`` (all when None), from /proc/stat."""
    idle = total = 0.0
    with open("/proc/stat") as handle:
        for line in handle:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            if cpus is not None and int(name[3:]) not in cpus:
                continue
            values = [float(v) for v in fields[:8]]
            idle += values[3] + values[4]  # idle + iowait
            total += sum(values)
    return idle, total
