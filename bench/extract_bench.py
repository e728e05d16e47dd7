"""Extraction benchmark: `lorafuse extract` against `cp -r` of the same base model, timed in one run.

Uses the bench model of bench/merge_bench.py (a random bf16 Qwen3-1.7B-shaped model and its rank-16 all-linear
adapter; ``--layers`` builds a shallower one) and builds with numpy, cached under bench/.cache/extract-L<layers>/:

- ``tuned16``: the base plus its rank-16 adapter's update ``W + alpha / r * B @ A``, rounded once to bf16 (what a
  merge writes), extracted at rank 16;
- ``tuned64``: the base plus a full-rank perturbation of every linear weight (a decaying spectrum plus noise),
  extracted at rank 64.

Default: reports each command's time as a ratio to the `cp -r` time of the base measured in the same run, its peak
RSS, the adapter size, the mean number of randomized-SVD passes per factorised tensor, and the approximation error
against the optimal rank-R error (Eckart-Young: the tail of the singular values), computed exactly for a sample of
tensors (``--sample`` of them). ``--power-iters`` is passed to the randomized runs (default: the extractor's, auto).

``--load``: issue 10's thread target instead. Each repetition runs, alternating, `cp -r` and
`lorafuse extract --rank 16` on an idle machine, then `lorafuse extract --rank 16` with default threads and with one
thread (``LORAFUSE_CPUS=1`` and the BLAS/OpenMP pools pinned to 1), each beside one competing CPU-bound process
(``python -c "while True: pass"``), and prints the ratios: under load, default / one thread (target: at most 1.5);
idle, extract / `cp -r`. Usage::

    python bench/extract_bench.py [--layers 28] [--skip-exact] [--sample 14] [--power-iters auto|N]
    python bench/extract_bench.py --load [--layers 28] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import ml_dtypes  # registers bfloat16 with numpy, so safetensors reads and writes the bf16 model as numpy arrays
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench  # noqa: E402
from _common import CACHE, lorafuse_command, run_measured, warm  # noqa: E402

BF16 = ml_dtypes.bfloat16
PEFT_PREFIX = "base_model.model."
MAX_X_ONE_THREAD = 1.5  # issue 10: default threads / one thread, beside one CPU-bound process
# The one-thread reference pins every pool, so it is one thread whatever lorafuse reads.
ONE_THREAD = {"LORAFUSE_CPUS": "1"} | {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def copy_changed(base: Path, dest: Path, change) -> None:
    """Copy ``base`` to ``dest``, replacing each shard's tensors by ``change(name, value)`` (None: unchanged)."""
    shutil.copytree(base, dest)
    for shard in shards(dest):
        tensors = load_file(shard)
        for name, value in tensors.items():
            changed = change(name, value)
            if changed is not None:
                tensors[name] = changed
        save_file(tensors, shard, metadata={"format": "pt"})
        del tensors


def apply_adapter(base: Path, adapter: Path, dest: Path) -> None:
    """``dest``: ``base`` with the PEFT adapter's update added in fp32 and rounded once to bf16."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = np.float32(config["lora_alpha"] / config["r"])
    factors = load_file(adapter / "adapter_model.safetensors")

    def change(name: str, value: np.ndarray) -> np.ndarray | None:
        key = PEFT_PREFIX + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" not in factors:
            return None
        update = factors[f"{key}.lora_B.weight"] @ factors[f"{key}.lora_A.weight"]
        return (value.astype(np.float32) + scale * update).astype(BF16)

    copy_changed(base, dest, change)


def perturb_full_rank(base: Path, dest: Path) -> None:
    """Copy ``base`` and add to every linear weight a full-rank change with a decaying spectrum, shard by shard."""
    rng = np.random.default_rng(2)
    k = 256
    decay = 1.0 / np.arange(1, k + 1, dtype=np.float32)

    def change(name: str, value: np.ndarray) -> np.ndarray | None:
        if not name.endswith("proj.weight"):
            return None
        out, inp = value.shape
        u = rng.standard_normal((out, k), dtype=np.float32) * decay
        delta = (u @ rng.standard_normal((k, inp), dtype=np.float32)) * np.float32(0.01 / math.sqrt(inp))
        delta += rng.standard_normal((out, inp), dtype=np.float32) * np.float32(1e-4)
        return (value.astype(np.float32) + delta).astype(BF16)

    copy_changed(base, dest, change)


def ensure_models(layers: int) -> tuple[Path, Path, Path]:
    """(base, tuned16, tuned64), built once."""
    base, adapter = merge_bench.ensure_models(1, layers)
    root = CACHE / f"extract-L{layers}"
    tuned16, tuned64, done = root / "tuned16", root / "tuned64", root / ".complete-numpy"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        print(f"building the tuned models in {root} (once)", flush=True)
        apply_adapter(base, adapter, tuned16)
        perturb_full_rank(base, tuned64)
        done.touch()
    return base, tuned16, tuned64


def read_weight(folder: Path, name: str) -> np.ndarray:
    for shard in shards(folder):
        with safe_open(shard, framework="np") as handle:
            if name in handle.keys():
                return handle.get_tensor(name).astype(np.float32)
    raise KeyError(name)


def optimal_errors(base: Path, tuned: Path, names: list[str], rank: int) -> dict[str, float]:
    """Eckart-Young: the smallest possible ||delta - rank-R approximation|| for each tensor in ``names``."""
    out: dict[str, float] = {}
    for name in names:
        s = np.linalg.svd(read_weight(tuned, name) - read_weight(base, name), compute_uv=False)
        out[name] = float(np.sqrt(np.square(s[rank:].astype(np.float64)).sum()))
    return out


def report_errors(folder: Path) -> tuple[dict[str, float], float, int, float]:
    """(absolute error per LoRA tensor, overall relative error, adapter bytes, mean SVD passes) from the report."""
    data = json.loads((folder / "lorafuse_extract.json").read_text())
    lora = [t for t in data["tensors"] if t["kind"] == "lora"]
    errors = {t["name"]: t["rel_error"] * t["delta_norm"] for t in lora}
    passes = sum(t.get("passes", 0) for t in lora) / max(1, len(lora))
    return errors, data["rel_error"], (folder / "adapter_model.safetensors").stat().st_size, passes


def quality(args: argparse.Namespace, base: Path, tuned16: Path, tuned64: Path, out: Path, cp_time: float) -> None:
    randomized = [] if args.power_iters is None else ["--power-iters", args.power_iters]
    runs = [("rank 16, randomized", tuned16, 16, randomized)]
    if not args.skip_exact:
        runs.append(("rank 16, --exact-svd", tuned16, 16, ["--exact-svd"]))
    runs.append(("rank 64, randomized", tuned64, 64, randomized))
    if not args.skip_exact:
        runs.append(("rank 64, --exact-svd", tuned64, 64, ["--exact-svd"]))

    print(
        f"{'command':<26} {'time / cp -r':>12} {'peak RSS':>9} {'CPU s':>6} {'adapter':>9} {'passes':>6} "
        f"{'rel. error':>10} {'/ optimal':>9}"
    )
    optimal: dict[tuple[Path, int], dict[str, float]] = {}
    for label, tuned, rank, extra in runs:
        cmd = [*lorafuse_command(), "extract", str(base), str(tuned), "-o", str(out), "--rank", str(rank), *extra]
        seconds, rss, cpu = run_measured(cmd)
        errors, rel, nbytes, passes = report_errors(out)
        if (tuned, rank) not in optimal:
            names = sorted(errors)
            step = max(1, len(names) // max(1, args.sample))
            optimal[(tuned, rank)] = optimal_errors(base, tuned, names[::step][: args.sample], rank)
        best = optimal[(tuned, rank)]
        ratio = math.sqrt(sum(errors[n] ** 2 for n in best)) / math.sqrt(sum(v**2 for v in best.values()))
        print(
            f"{label:<26} {seconds / cp_time:>12.2f} {rss / 1e9:>7.2f}GB {cpu:>6.1f} {nbytes / 1e6:>7.1f}MB "
            f"{passes:>6.2f} {rel:>10.3e} {ratio:>9.4f}",
            flush=True,
        )
        shutil.rmtree(out)
    print(f"(cp -r took {cp_time:.2f} s; error / optimal over {args.sample} sampled tensors, Eckart-Young)")


def under_load(args: argparse.Namespace, base: Path, tuned16: Path, out: Path) -> None:
    """Default threads against one thread beside one busy process, and the idle ratio to cp -r, alternating."""
    extract = [*lorafuse_command(), "extract", str(base), str(tuned16), "-o", str(out), "--rank", "16"]
    variants = {
        "cp -r": (["cp", "-r", str(base), str(out)], {}, False),
        "idle": (extract, {}, False),
        "load": (extract, {}, True),
        "load-1thread": (extract, ONE_THREAD, True),
    }
    runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in variants}
    for rep in range(args.repeat):
        for name, (cmd, env, load) in variants.items():
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(run_measured(cmd, env, load))
            seconds, rss, cpu = runs[name][-1]
            print(f"  repetition {rep + 1}: {name:<12} {seconds:6.2f} s, CPU {cpu:6.2f} s, RSS {rss / 2**20:5.0f} MiB")
        shutil.rmtree(out, ignore_errors=True)

    def ratios(name: str, reference: str) -> list[float]:
        return [a[0] / b[0] for a, b in zip(runs[name], runs[reference])]

    def median(name: str, field: int) -> float:
        return statistics.median(run[field] for run in runs[name])

    print(f"\n{'variant':<13} {'median s':>8} {'CPU s':>6} {'peak RSS':>9}  ratio (per repetition, median)")
    for name, reference in (("cp -r", None), ("idle", "cp -r"), ("load", "load-1thread"), ("load-1thread", None)):
        rss = max(run[1] for run in runs[name]) / 2**20
        line = f"{name:<13} {median(name, 0):8.2f} {median(name, 2):6.2f} {rss:5.0f} MiB"
        if reference:
            x = ratios(name, reference)
            line += f"  x {reference}: {', '.join(f'{v:.2f}' for v in x)} (median {statistics.median(x):.2f})"
            if name == "load":
                ok = statistics.median(x) <= MAX_X_ONE_THREAD
                line += f", target <= {MAX_X_ONE_THREAD}: {'ok' if ok else 'OVER'}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    layers = merge_bench.LAYERS
    parser.add_argument("--layers", type=int, default=layers, help=f"decoder layers ({layers}: the full 1.7B shape)")
    parser.add_argument("--skip-exact", action="store_true", help="do not run --exact-svd (slow on 2 cores)")
    parser.add_argument("--sample", type=int, default=14, help="tensors whose optimal error is computed exactly")
    parser.add_argument("--power-iters", default=None, help="passed to the randomized runs (default: auto)")
    parser.add_argument("--load", action="store_true", help="default threads vs one thread beside a busy process")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of --load (alternating)")
    args = parser.parse_args()

    base, tuned16, tuned64 = ensure_models(args.layers)
    out = CACHE / "extract-out"
    size = sum(p.stat().st_size for p in shards(base))
    print(f"base {size / 1e9:.2f} GB ({args.layers} layers)")
    warm([base, tuned16] if args.load else [base, tuned16, tuned64])
    shutil.rmtree(out, ignore_errors=True)
    if args.load:
        under_load(args, base, tuned16, out)
        return
    cp_time = run_measured(["cp", "-r", str(base), str(out)])[0]
    shutil.rmtree(out)
    quality(args, base, tuned16, tuned64, out, cp_time)


if __name__ == "__main__":
    main()
