"""Extraction benchmark: `lorafuse extract` against `cp -r` of the same base model, timed in one run.

Uses the bench model of bench/merge_bench.py (a random bf16 Qwen3-1.7B-shaped model and its rank-16 all-linear
adapter; ``--layers`` builds a shallower one) and builds, cached under bench/.cache/extract-L<layers>/:

- ``tuned16``: the base merged with its rank-16 adapter (`lorafuse merge`), extracted at rank 16;
- ``tuned64``: the base plus a full-rank perturbation of every linear weight (a decaying spectrum plus noise),
  extracted at rank 64.

Reports each command's time as a ratio to the `cp -r` time of the base measured in the same run, its peak RSS,
the adapter size, the mean number of randomized-SVD passes per factorised tensor, and the approximation error
against the optimal rank-R error (Eckart-Young: the tail of the singular values), computed exactly for a sample of
tensors (``--sample`` of them). ``--power-iters`` is passed to the randomized runs (default: the extractor's, auto).
Usage::

    python bench/extract_bench.py [--layers 28] [--skip-exact] [--sample 14] [--power-iters auto|N]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench  # noqa: E402
from merge_bench import CACHE, LAYERS, build_adapter, build_base, run_measured, warm  # noqa: E402

# Not `python -m lorafuse.cli`: run as __main__, cli.py would not see the sub-commands other modules register.
LORAFUSE = [sys.executable, "-c", "import sys; from lorafuse.cli import main; sys.exit(main())"]


def perturb_full_rank(base: Path, dest: Path) -> None:
    """Copy ``base`` and add to every linear weight a full-rank change with a decaying spectrum, shard by shard."""
    shutil.copytree(base, dest)
    gen = torch.Generator().manual_seed(2)
    for shard in sorted(dest.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, value in tensors.items():
            if name.endswith("proj.weight"):
                out, inp = value.shape
                k = 256
                decay = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
                u = torch.randn(out, k, generator=gen) * decay
                change = (u @ torch.randn(k, inp, generator=gen)) * (0.01 / math.sqrt(inp))
                change += torch.randn(out, inp, generator=gen) * 1e-4
                tensors[name] = (value.float() + change).to(value.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
        del tensors


def ensure_models(layers: int) -> tuple[Path, Path, Path]:
    root = CACHE / f"extract-L{layers}"
    base, adapter, tuned16, tuned64 = root / "base", root / "adapter", root / "tuned16", root / "tuned64"
    if layers == LAYERS:  # the merge benchmark's own model, shared
        base, adapter = merge_bench.ensure_models(1)
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if layers != LAYERS:
            print(f"building a random Qwen3-1.7B-shaped model with {layers} layers in {root} (once)", flush=True)
            build_base(base, layers)
            build_adapter(adapter, layers)
        subprocess.run([*LORAFUSE, "merge", str(base), str(adapter), "-o", str(tuned16)], check=True)
        perturb_full_rank(base, tuned64)
        done.touch()
    return base, tuned16, tuned64


def optimal_errors(base: Path, tuned: Path, names: list[str], rank: int) -> dict[str, float]:
    """Eckart-Young: the smallest possible ||delta - rank-R approximation|| for each tensor in ``names``."""
    from lorafuse.io.checkpoint import open_model

    out: dict[str, float] = {}
    b, _, _ = open_model(base)
    t, _, _ = open_model(tuned)
    try:
        for name in names:
            delta = t.get(name).float() - b.get(name).float()
            s = torch.linalg.svdvals(delta)
            out[name] = float(s[rank:].square().sum().sqrt())
    finally:
        b.close()
        t.close()
    return out


def report_errors(folder: Path) -> tuple[dict[str, float], float, int, float]:
    """(absolute error per LoRA tensor, overall relative error, adapter bytes, mean SVD passes) from the report."""
    data = json.loads((folder / "lorafuse_extract.json").read_text())
    lora = [t for t in data["tensors"] if t["kind"] == "lora"]
    errors = {t["name"]: t["rel_error"] * t["delta_norm"] for t in lora}
    passes = sum(t.get("passes", 0) for t in lora) / max(1, len(lora))
    return errors, data["rel_error"], (folder / "adapter_model.safetensors").stat().st_size, passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (28: the full 1.7B shape)")
    parser.add_argument("--skip-exact", action="store_true", help="do not run --exact-svd (slow on 2 cores)")
    parser.add_argument("--sample", type=int, default=14, help="tensors whose optimal error is computed exactly")
    parser.add_argument("--power-iters", default=None, help="passed to the randomized runs (default: auto)")
    args = parser.parse_args()

    base, tuned16, tuned64 = ensure_models(args.layers)
    out = CACHE / "extract-out"
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"base {size / 1e9:.2f} GB ({args.layers} layers)")
    warm([base, tuned16, tuned64])

    shutil.rmtree(out, ignore_errors=True)
    cp_time, cp_rss = run_measured(["cp", "-r", str(base), str(out)])[:2]
    shutil.rmtree(out)
    randomized = [] if args.power_iters is None else ["--power-iters", args.power_iters]
    runs = [("rank 16, randomized", tuned16, 16, randomized)]
    if not args.skip_exact:
        runs.append(("rank 16, --exact-svd", tuned16, 16, ["--exact-svd"]))
    runs.append(("rank 64, randomized", tuned64, 64, randomized))
    if not args.skip_exact:
        runs.append(("rank 64, --exact-svd", tuned64, 64, ["--exact-svd"]))

    print(
        f"{'command':<26} {'time / cp -r':>12} {'peak RSS':>9} {'adapter':>9} {'passes':>6} {'rel. error':>10} "
        f"{'/ optimal':>9}"
    )
    print(f"{'cp -r':<26} {1.0:>12.2f} {cp_rss / 1e9:>7.2f}GB")
    optimal: dict[tuple[Path, int], dict[str, float]] = {}
    for label, tuned, rank, extra in runs:
        cmd = [*LORAFUSE, "extract", str(base), str(tuned), "-o", str(out), "--rank", str(rank), *extra]
        seconds, rss = run_measured(cmd)[:2]
        errors, rel, nbytes, passes = report_errors(out)
        if (tuned, rank) not in optimal:
            names = sorted(errors)
            step = max(1, len(names) // max(1, args.sample))
            optimal[(tuned, rank)] = optimal_errors(base, tuned, names[::step][: args.sample], rank)
        best = optimal[(tuned, rank)]
        ratio = math.sqrt(sum(errors[n] ** 2 for n in best)) / math.sqrt(sum(v**2 for v in best.values()))
        print(
            f"{label:<26} {seconds / cp_time:>12.2f} {rss / 1e9:>7.2f}GB {nbytes / 1e6:>7.1f}MB {passes:>6.2f} "
            f"{rel:>10.3e} {ratio:>9.4f}",
            flush=True,
        )
        shutil.rmtree(out)
    print(f"(cp -r took {cp_time:.2f} s; error / optimal over {args.sample} sampled tensors, Eckart-Young)")


if __name__ == "__main__":
    main()
