"""Verify / inspect benchmark: `lorafuse verify` (weight level) and `lorafuse inspect` against `cp -r`, in one run.

Uses the bench model of bench/merge_bench.py (a random bf16 Qwen3-1.7B-shaped model and its rank-16 all-linear
adapter) and its lorafuse merge (built once under bench/.cache/verify-merged). Alternates `cp -r` of the base,
`lorafuse verify MERGED --base BASE --adapter A --no-output-check` (reads base and merged model, recomputes the
adapted tensors in fp32), `lorafuse inspect ADAPTER` and `lorafuse inspect BASE`, and prints each time as a ratio
to the `cp -r` time of the same repetition, with peak RSS. Usage::

    python bench/verify_bench.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import CACHE, ensure_models, run_measured, warm  # noqa: E402

LORAFUSE = [sys.executable, "-m", "lorafuse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each command (alternating)")
    args = parser.parse_args()

    base, adapter = ensure_models(1)
    merged = CACHE / "verify-merged"
    if not (merged / "lorafuse_merge.json").exists():
        subprocess.run([*LORAFUSE, "merge", str(base), str(adapter), "-o", str(merged), "--overwrite"], check=True)
    out = CACHE / "out"
    commands = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "verify": [
            *LORAFUSE,
            "verify",
            str(merged),
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--no-output-check",
        ],
        "inspect adapter": [*LORAFUSE, "inspect", str(adapter)],
        "inspect base": [*LORAFUSE, "inspect", str(base)],
    }
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"base {size / 1e9:.2f} GB, {args.repeat} repetitions")
    warm([base, adapter, merged])
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in commands}
    for rep in range(args.repeat):
        for name, cmd in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(run_measured(cmd))
            seconds, rss, _cpu = results[name][-1]
            print(f"  rep {rep + 1} {name:16s} {seconds:7.2f} s  peak RSS {rss / 2**20:6.0f} MiB")
    shutil.rmtree(out, ignore_errors=True)
    floor = [t for t, _, _ in results["cp -r"]]
    print("\nratios to `cp -r` of the base in the same repetition")
    for name, runs in results.items():
        ratios = [t / f for (t, _, _), f in zip(runs, floor)]
        peak = max(r for _, r, _ in runs)
        cpu = statistics.median(c for _, _, c in runs)
        print(f"{name:16s} median {statistics.median(ratios):6.2f}  peak RSS {peak / 2**20:6.0f} MiB  cpu {cpu:6.1f} s")
    print(f"1-min load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine inflates the ratios)")


if __name__ == "__main__":
    main()
