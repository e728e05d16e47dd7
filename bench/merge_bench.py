"""Merge benchmark: `lorafuse merge` and PEFT against `cp -r` of the same base model, timed in one run.

Builds once (cached under bench/.cache/) a random bf16 model shaped like Qwen3-1.7B (two safetensors shards and
an index) and a rank-16 all-linear PEFT adapter, both written directly with safetensors (no model is
instantiated). Then runs, alternating, `cp -r` of the base folder, `lorafuse merge` (the CLI, as a subprocess)
and PEFT (`from_pretrained` + `merge_and_unload` + `save_pretrained`, as a subprocess), and prints every time as
a ratio to the `cp -r` time of the same repetition, with each command's peak RSS and CPU time (measured by a
tiny wrapper around that command alone).

Everything runs with a warm page cache: the base and adapter are read once before timing, and dirty pages of
the previous output are synced (outside the timing) before each command, so each command starts from the same
state. Usage::

    python bench/merge_bench.py [--scale 2] [--repeat 3] [--skip-peft]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CACHE = Path(__file__).resolve().parent / ".cache"

# Qwen3-1.7B
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 151936, 2048, 6144, 28, 16, 8, 128
RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA-targeted linear layer of one decoder layer."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {
        "self_attn.q_proj": (q, HIDDEN),
        "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN),
        "self_attn.o_proj": (HIDDEN, q),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }


def layer_tensors(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    prefix = f"model.layers.{i}."
    tensors = {prefix + name + ".weight": rand(*shape) for name, shape in linear_shapes().items()}
    for norm, size in (
        ("input_layernorm", HIDDEN),
        ("post_attention_layernorm", HIDDEN),
        ("self_attn.q_norm", HEAD_DIM),
        ("self_attn.k_norm", HEAD_DIM),
    ):
        tensors[prefix + norm + ".weight"] = torch.ones(size, dtype=torch.bfloat16)
    return tensors


def config(layers: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
    }


def build_base(folder: Path, layers: int) -> None:
    """Two shards, split by layer halves, plus the index; written tensor group by tensor group."""
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    halves = [range(0, layers // 2), range(layers // 2, layers)]
    names = [f"model-{k + 1:05d}-of-00002.safetensors" for k in range(2)]
    weight_map: dict[str, str] = {}
    total = 0
    for k, layer_range in enumerate(halves):
        shard: dict[str, torch.Tensor] = {}
        if k == 0:
            shard["model.embed_tokens.weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).to(torch.bfloat16)
        for i in layer_range:
            shard.update(layer_tensors(i, gen))
        if k == 1:
            shard["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        save_file(shard, folder / names[k], metadata={"format": "pt"})
        weight_map.update({name: names[k] for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config(layers), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))


def build_adapter(folder: Path, layers: int) -> None:
    gen = torch.Generator().manual_seed(1)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, (out, inp) in linear_shapes().items():
            key = f"base_model.model.model.layers.{i}.{name}"
            tensors[key + ".lora_A.weight"] = torch.randn(RANK, inp, generator=gen) / inp**0.5
            tensors[key + ".lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.01  # nonzero: a trained B
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "base_model_name_or_path": "Qwen/Qwen3-1.7B",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def ensure_models(scale: int) -> tuple[Path, Path]:
    root = CACHE / f"qwen3-1.7b-x{scale}"
    base, adapter, done = root / "base", root / "adapter", root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        layers = LAYERS * scale
        print(f"building a random Qwen3-1.7B-shaped model with {layers} layers in {root} (once)", flush=True)
        build_base(base, layers)
        build_adapter(adapter, layers)
        done.touch()
    return base, adapter


def warm(paths: list[Path]) -> None:
    """Read every file once so all commands start with the inputs in the page cache."""
    for root in paths:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                with open(path, "rb") as handle:
                    while handle.read(64 << 20):
                        pass


# Runs the command and prints its peak RSS (KiB). A child's ru_maxrss counts the pages it shared with its parent
# before exec, so the command is started from this small wrapper rather than from the benchmark process itself.
WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
sys.exit(code)
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Run ``cmd`` (with ``env`` added to the environment); (wall s, peak RSS in bytes, CPU s) of the command alone."""
    os.sync()  # flush the previous output's dirty pages outside the timing
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-S", "-c", WRAPPER, *cmd],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    cpu, rss = proc.stdout.split()[-2:]
    return elapsed, int(rss) * 1024, float(cpu)  # Linux reports ru_maxrss in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of layers (2: twice the model)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each command (alternating)")
    parser.add_argument("--skip-peft", action="store_true", help="do not run PEFT (slow, needs ~4 GB per scale)")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run lorafuse with the torch engine (no fast path), without its prefill, and with one math thread",
    )
    args = parser.parse_args()

    base, adapter = ensure_models(args.scale)
    out = CACHE / f"merge-bench-out-{os.getpid()}"  # private: other benchmarks share bench/.cache
    lorafuse = shutil.which("lorafuse") or sys.exit("the lorafuse command is not installed: pip install -e .")
    commands = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "lorafuse": [lorafuse, "merge", str(base), str(adapter), "-o", str(out)],
    }
    envs = {
        "torch-engine": {"LORAFUSE_FASTPATH": "0"},
        "no-prefill": {"LORAFUSE_PREFILL": "0"},
        "1-math": {"LORAFUSE_MATH_THREADS": "1"},
    }
    if args.variants:
        for name in envs:
            commands[name] = commands["lorafuse"]
    if not args.skip_peft:
        commands["peft"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"base {size / 1e9:.2f} GB ({LAYERS * args.scale} layers), adapter rank {RANK}, {args.repeat} repetitions")
    warm([base, adapter])

    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in commands}
    for rep in range(args.repeat):
        for name, cmd in commands.items():
            if out.exists():
                shutil.rmtree(out)
            results[name].append(run_measured(cmd, envs.get(name)))
            seconds, rss, cpu = results[name][-1]
            print(f"  rep {rep + 1} {name:9s} {seconds:7.2f} s  cpu {cpu:6.2f} s  peak RSS {rss / 2**20:6.0f} MiB")
    shutil.rmtree(out)

    floor = [t for t, _, _ in results["cp -r"]]
    load = os.getloadavg()[0]
    print(f"\nratios to `cp -r` of the same repetition (1-min load average at the end: {load:.1f})")
    print(f"{'command':10s} {'median':>7s} {'per repetition':>24s} {'peak RSS':>10s} {'cpu s (median)':>15s}")
    for name, runs in results.items():
        ratios = [t / f for (t, _, _), f in zip(runs, floor)]
        per = " ".join(f"{r:.2f}" for r in ratios)
        peak = max(r for _, r, _ in runs)
        cpu = statistics.median(c for _, _, c in runs)
        print(f"{name:10s} {statistics.median(ratios):7.2f} {per:>24s} {peak / 2**20:6.0f} MiB {cpu:15.2f}")


if __name__ == "__main__":
    main()
