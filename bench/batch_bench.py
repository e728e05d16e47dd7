"""Fleet benchmark: 8 merges of one base as 8 sequential `lorafuse merge` runs, as `lorafuse batch --executor local`
and as `lorafuse batch --executor ray`; and one merge of the 1.7B bench model split across 2 workers
(`lorafuse merge --workers 2`, local processes and Ray tasks) against the one-process merge. In one run.

Builds once (cached under bench/.cache/) a random bf16 model shaped like Qwen2.5-0.5B (tied embeddings, q/k/v
biases) with 8 different rank-16 all-linear PEFT LoRA adapters, written with numpy and safetensors; the 1.7B model
and its adapter are merge_bench.py's. Every command is a subprocess, inputs warm in the page cache, the previous
outputs removed and synced outside the timing; the Ray cluster (`ray start --head`) is started before the timed
runs, so its start-up (seconds) is not counted: it is reported apart. Each variant's weight files are compared
byte for byte with the sequential / one-process ones. Usage::

    python bench/batch_bench.py [--layers N] [--vocab N] [--layers-1p7b N] [--repeat 1] [--skip-ray] [--json FILE]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, decoder_linear_shapes, lorafuse_command, run_measured, warm  # noqa: E402

# Qwen2.5-0.5B
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 151936, 896, 4864, 24, 14, 2, 64
RANK, ALPHA, ADAPTERS = 16, 32, 8
BF16 = ml_dtypes.bfloat16
PEFT_PREFIX = "base_model.model."
JOBS = 8


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA-targeted linear layer of one decoder layer of this bench's model."""
    return decoder_linear_shapes(HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM)


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def build_base(folder: Path, layers: int, vocab: int) -> None:
    """One safetensors file (as Qwen2.5-0.5B ships) and its config."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": (_randn(rng, vocab, HIDDEN) * 0.02).astype(BF16)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name, shape in linear_shapes().items():
            tensors[prefix + name + ".weight"] = (_randn(rng, *shape) * 0.02).astype(BF16)
            if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
                tensors[prefix + name + ".bias"] = (_randn(rng, shape[0]) * 0.02).astype(BF16)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[prefix + norm + ".weight"] = np.ones(HIDDEN, dtype=BF16)
    tensors["model.norm.weight"] = np.ones(HIDDEN, dtype=BF16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def build_adapter(folder: Path, layers: int, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for i in range(layers):
        for name, (out, inp) in linear_shapes().items():
            key = f"{PEFT_PREFIX}model.layers.{i}.{name}"
            tensors[key + ".lora_A.weight"] = _randn(rng, RANK, inp) / np.float32(inp**0.5)
            tensors[key + ".lora_B.weight"] = _randn(rng, out, RANK) * np.float32(0.01)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": [name.split(".")[-1] for name in linear_shapes()],
        "bias": "none",
        "base_model_name_or_path": "Qwen/Qwen2.5-0.5B",
        "fan_in_fan_out": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def ensure_fleet(layers: int, vocab: int) -> tuple[Path, list[Path]]:
    """The 0.5B-shaped base and its 8 adapters, built once."""
    root = CACHE / f"qwen2.5-0.5b-L{layers}-V{vocab}"
    base, done = root / "base", root / ".complete"
    adapters = [root / f"adapter-{k}" for k in range(ADAPTERS)]
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"building a random Qwen2.5-0.5B-shaped model with {layers} layers and 8 adapters in {root} (once)")
        build_base(base, layers, vocab)
        for k, folder in enumerate(adapters):
            build_adapter(folder, layers, k)
        done.touch()
    return base, adapters


def same_weights(got: Path, want: Path) -> bool:
    """The weight files and the index of two merged folders are byte-identical."""
    names = sorted(p.name for p in want.iterdir() if p.name.startswith("model"))
    got_names = sorted(p.name for p in got.iterdir() if p.name.startswith("model"))
    return names == got_names and all(filecmp.cmp(got / n, want / n, shallow=False) for n in names)


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    for report in path.parent.glob("*.report.json"):
        report.unlink()


def time_fleet(base: Path, adapters: list[Path], work: Path, ray_address: str | None, repeat: int) -> dict:
    lorafuse = lorafuse_command()
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "fleet.json"
    jobs = [
        {"command": "merge", "id": f"m{k}", "base": str(base), "adapters": [str(a)], "output": f"batch/m{k}"}
        for k, a in enumerate(adapters)
    ]
    manifest.write_text(json.dumps({"jobs": jobs}))
    seq, batch = work / "seq", work / "batch"
    times: dict[str, list[float]] = {"sequential": [], "batch local": [], "batch ray": []}
    identical: dict[str, bool] = {}
    for _ in range(repeat):
        clear(seq)
        seq.mkdir(parents=True)
        started = time.perf_counter()
        for k, adapter in enumerate(adapters):
            run_measured([*lorafuse, "merge", str(base), str(adapter), "-o", str(seq / f"m{k}"), "-q"])
        times["sequential"].append(time.perf_counter() - started)
        for variant, extra in (("batch local", ["--executor", "local"]), ("batch ray", ["--executor", "ray"])):
            if variant == "batch ray" and ray_address is None:
                continue
            clear(batch)
            env = {"RAY_ADDRESS": ray_address} if variant == "batch ray" and ray_address else None
            wall, _, _ = run_measured([*lorafuse, "batch", str(manifest), *extra, "-q"], env=env)
            times[variant].append(wall)
            identical[variant] = all(same_weights(batch / f"m{k}", seq / f"m{k}") for k in range(len(adapters)))
    return {"times": {k: v for k, v in times.items() if v}, "identical": identical}


def time_shards(layers: int, work: Path, ray_address: str | None, repeat: int, shard_size: str) -> dict:
    from merge_bench import ensure_models

    base, adapter = ensure_models(layers=layers)
    warm([base, adapter])
    lorafuse = lorafuse_command()
    work.mkdir(parents=True, exist_ok=True)
    one, split = work / "one", work / "split"
    variants = {"one process": [], "--workers 2 (local)": ["--workers", "2"]}
    if ray_address is not None:
        variants["--workers 2 (ray)"] = ["--executor", "ray", "--workers", "2"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    identical: dict[str, bool] = {}
    for _ in range(repeat):
        for name, extra in variants.items():
            out = one if name == "one process" else split
            clear(out)
            env = {"RAY_ADDRESS": ray_address} if "ray" in name and ray_address else None
            cmd = [*lorafuse, "merge", str(base), str(adapter), "-o", str(out), "--max-shard-size", shard_size, "-q"]
            wall, _, _ = run_measured([*cmd, *extra], env=env)
            times[name].append(wall)
            if out == split:
                identical[name] = same_weights(split, one)
    shards = len(list(one.glob("*.safetensors")))
    size = sum(p.stat().st_size for p in one.glob("*.safetensors"))
    return {"times": times, "identical": identical, "shards": shards, "bytes": size, "layers": layers}


def start_ray(cpus: int) -> tuple[str | None, float]:
    """A local Ray head (``ray start``): its address and how long it took to start."""
    ray = shutil.which("ray")
    if ray is None:
        print("ray is not installed: the Ray variants are left out (pip install 'lorafuse[ray]')")
        return None, 0.0
    started = time.perf_counter()
    subprocess.run(
        [ray, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats"],
        check=True,
        capture_output=True,
    )
    return "auto", time.perf_counter() - started


def stop_ray() -> None:
    ray = shutil.which("ray")
    if ray is not None:
        subprocess.run([ray, "stop", "--force"], check=False, capture_output=True)


def print_table(title: str, times: dict[str, list[float]], reference: str, identical: dict[str, bool]) -> None:
    print(title)
    ref = statistics.median(times[reference])
    for name, values in times.items():
        wall = statistics.median(values)
        same = "" if name == reference else f"  bytes identical: {identical.get(name)}"
        print(f"  {name:<22} {wall:7.2f} s  x{wall / ref:5.2f} of {reference}{same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers of the 0.5B-shaped model")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary of the 0.5B-shaped model")
    parser.add_argument("--layers-1p7b", type=int, default=28, help="decoder layers of the 1.7B bench model")
    parser.add_argument("--shard-size", default="1GB", help="--max-shard-size of the shard-parallel merges")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base, adapters = ensure_fleet(args.layers, args.vocab)
    warm([base, *adapters])
    address, ray_start = (None, 0.0) if args.skip_ray else start_ray(os.cpu_count() or 1)
    try:
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="batch-bench-") as tmp:
            work = Path(tmp)
            fleet = time_fleet(base, adapters, work / "fleet", address, args.repeat)
            shards = time_shards(args.layers_1p7b, work / "shards", address, args.repeat, args.shard_size)
    finally:
        if address is not None:
            stop_ray()
    cpus = len(os.sched_getaffinity(0))
    print(f"{cpus} CPUs; Ray head start-up {ray_start:.1f} s (not counted below)")
    print_table(
        f"8 merges of a 0.5B-shaped model ({args.layers} layers)", fleet["times"], "sequential", fleet["identical"]
    )
    print_table(
        f"1.7B model ({shards['layers']} layers, {shards['bytes'] / 1e9:.2f} GB in {shards['shards']} shards)",
        shards["times"],
        "one process",
        shards["identical"],
    )
    if args.json:
        result = {"cpus": cpus, "ray_start_s": ray_start, "fleet": fleet, "shards": shards, "args": vars(args)}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
