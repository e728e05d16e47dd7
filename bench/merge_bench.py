"""Merge benchmark: `lorafuse merge` (CLI and Python API) against `cp -r` of the same base model, in one run.

Builds once (cached under bench/.cache/) a random bf16 model shaped like Qwen3-1.7B (two safetensors shards and
an index), a rank-16 all-linear PEFT LoRA adapter and the same adapter as DoRA (its factors plus magnitudes near
the adapted weight's row norms), all written directly with numpy and safetensors (no model is instantiated).
Then runs each variant below once per repetition, alternating, each command as a subprocess, and prints every
time as a ratio to the `cp -r` of the same repetition (and, where a variant has one, to its reference variant of
the same repetition), with the command's peak RSS and CPU time (measured by a tiny wrapper around that command
alone). Before timing it checks whether `lorafuse --help` and the tiny example's merge import torch.

Everything runs with a warm page cache: the inputs are read once before timing, and dirty pages of the previous
output are synced (outside the timing) before each command, so each command starts from the same state. Usage::

    python bench/merge_bench.py [--scale 2] [--layers N] [--repeat 3] [--skip-peft] [--skip-dora] [--load]
                                [--variants] [--tuners] [--only NAMES] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # registers bfloat16 with numpy, so safetensors reads the bf16 base into numpy arrays
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, CommandFailed, decoder_linear_shapes, lorafuse_command, run_measured, warm  # noqa: E402
from tuner_adapters import ensure_tuner_adapter  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny"

# Qwen3-1.7B
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 151936, 2048, 6144, 28, 16, 8, 128
RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
BF16 = ml_dtypes.bfloat16

# Issue 10's targets.
MAX_X_CP = 1.3  # lorafuse merge (CLI and API) / cp -r
MAX_RSS_MB = 200  # peak RSS of every lorafuse merge, in MB (10**6 bytes)
MAX_X_LORA = 1.5  # DoRA merge / LoRA merge
MAX_X_ONE_THREAD = 1.5  # default threads / one thread, beside one CPU-bound process
# Issue 12's targets: LoHa, LoKr and IA3 merges against the plain LoRA merge of the same repetition.
TUNERS = ("loha", "lokr", "ia3")
MAX_X_LORA_TUNER = 1.5
MAX_RSS_TUNER_MB = 200

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

API_SCRIPT = "import sys, lorafuse; lorafuse.merge(sys.argv[1], [sys.argv[2]], sys.argv[3])"

# Runs the rest of the script after recording (in the file named by the first argument) where lorafuse first
# imports torch: a meta-path finder sees every top-level import before it happens, whatever the exit path.
TORCH_WATCH = """
import sys
report = sys.argv.pop(1)
class Watch:
    seen = False
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not self.seen:
            self.seen = True
            import traceback
            ours = [f.filename.replace("\\\\", "/") + f":{f.lineno}" for f in traceback.extract_stack()]
            ours = ["lorafuse/" + f.rsplit("/lorafuse/", 1)[1] for f in ours if "/lorafuse/" in f]
            with open(report, "w") as handle:
                handle.write(" < ".join(ours[::-1][:3]) if ours else "outside lorafuse")
        return None
sys.meta_path.insert(0, Watch())
"""
RUN_CLI = """
from importlib.metadata import entry_points
(script,) = entry_points(group="console_scripts", name="lorafuse")
sys.argv[0] = "lorafuse"
sys.exit(script.load()())
"""


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA-targeted linear layer of one decoder layer of this bench's model."""
    return decoder_linear_shapes(HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM)


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def layer_tensors(i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    prefix = f"model.layers.{i}."
    tensors = {
        prefix + name + ".weight": (_randn(rng, *shape) * 0.02).astype(BF16) for name, shape in linear_shapes().items()
    }
    for norm, size in (
        ("input_layernorm", HIDDEN),
        ("post_attention_layernorm", HIDDEN),
        ("self_attn.q_norm", HEAD_DIM),
        ("self_attn.k_norm", HEAD_DIM),
    ):
        tensors[prefix + norm + ".weight"] = np.ones(size, dtype=BF16)
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
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    halves = [range(0, layers // 2), range(layers // 2, layers)]
    names = [f"model-{k + 1:05d}-of-00002.safetensors" for k in range(2)]
    weight_map: dict[str, str] = {}
    total = 0
    for k, layer_range in enumerate(halves):
        shard: dict[str, np.ndarray] = {}
        if k == 0:
            shard["model.embed_tokens.weight"] = (_randn(rng, VOCAB, HIDDEN) * 0.02).astype(BF16)
        for i in layer_range:
            shard.update(layer_tensors(i, rng))
        if k == 1:
            shard["model.norm.weight"] = np.ones(HIDDEN, dtype=BF16)
        save_file(shard, folder / names[k], metadata={"format": "pt"})
        weight_map.update({name: names[k] for name in shard})
        total += sum(t.nbytes for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config(layers), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))


def build_adapter(folder: Path, layers: int) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for i in range(layers):
        for name, (out, inp) in linear_shapes().items():
            key = f"{PEFT_PREFIX}model.layers.{i}.{name}"
            tensors[key + ".lora_A.weight"] = _randn(rng, RANK, inp) / np.float32(inp**0.5)
            tensors[key + ".lora_B.weight"] = _randn(rng, out, RANK) * np.float32(0.01)  # nonzero: a trained B
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


def build_dora_adapter(base: Path, lora: Path, folder: Path) -> None:
    """``lora``'s factors plus one DoRA magnitude per module, saved as PEFT saves DoRA (``use_dora`` in the config).

    PEFT initialises the magnitude to the row norms of the base weight (``DoraLinearLayer.get_weight_norm``, with
    lora_B still zero) and training moves it; here: the row norms of the adapted weight ``W + scaling * B @ A``,
    each moved by about 1%, so the merge's rescale is realistic (a factor near 1, never exactly 1). Stored in
    fp32 like the factors (PEFT keeps adapter weights in fp32 by default) under the key PEFT writes:
    ``base_model.model.<module>.lora_magnitude_vector``.
    """
    rng = np.random.default_rng(3)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    scaling = np.float32(cfg["lora_alpha"] / cfg["r"])
    tensors = load_file(lora / "adapter_model.safetensors")
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    modules = sorted(
        key[len(PEFT_PREFIX) : -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")
    )
    for shard in sorted(set(weight_map.values())):
        with safe_open(base / shard, framework="np") as handle:
            for module in modules:
                if weight_map[module + ".weight"] != shard:
                    continue
                key = PEFT_PREFIX + module
                adapted = handle.get_tensor(module + ".weight").astype(np.float32)
                adapted += scaling * (tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"])
                norms = np.linalg.norm(adapted, axis=1)
                tensors[key + ".lora_magnitude_vector"] = norms * (1 + np.float32(0.01) * _randn(rng, norms.size))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}, indent=2))


def model_root(layers: int) -> Path:
    """The cache folder of the bench model with ``layers`` decoder layers (full multiples keep their old name)."""
    return CACHE / (f"qwen3-1.7b-x{layers // LAYERS}" if layers % LAYERS == 0 else f"qwen3-1.7b-L{layers}")


def ensure_models(scale: int = 1, layers: int = LAYERS) -> tuple[Path, Path]:
    """The bench base model with ``layers * scale`` decoder layers and its LoRA adapter, built once."""
    layers *= scale
    root = model_root(layers)
    base, adapter, done = root / "base", root / "adapter", root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"building a random Qwen3-1.7B-shaped model with {layers} layers in {root} (once)", flush=True)
        build_base(base, layers)
        build_adapter(adapter, layers)
        done.touch()
    return base, adapter


def ensure_dora_adapter(base: Path, adapter: Path) -> Path:
    """The DoRA version of ``adapter`` (next to it), built once."""
    folder, done = adapter.parent / "adapter-dora", adapter.parent / ".complete-dora"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building its DoRA adapter in {folder} (once)", flush=True)
        build_dora_adapter(base, adapter, folder)
        done.touch()
    return folder


@dataclass
class Variant:
    """One measured command; its times are divided by `cp -r` of the same repetition, and by ``reference``'s."""

    name: str
    what: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    load: bool = False  # beside one competing CPU-bound process
    reference: str | None = None
    max_x_cp: float | None = None
    max_x_ref: float | None = None
    max_rss_mb: float | None = None
    runs: dict[int, tuple[float, int, float]] = field(default_factory=dict)  # repetition -> (s, RSS bytes, CPU s)
    missing: str | None = None  # why it is n/a


def build_variants(
    args: argparse.Namespace,
    base: Path,
    adapter: Path,
    dora: Path | None,
    out: Path,
    tuners: dict[str, Path] | None = None,
) -> list[Variant]:
    """Every variant the options ask for, in the order each repetition runs them."""
    cli = [*lorafuse_command(), "merge"]
    merge_cli = [*cli, str(base), str(adapter), "-o", str(out)]
    bound = {"max_rss_mb": MAX_RSS_MB}
    found = [
        Variant("cp -r", "cp -r of the base", ["cp", "-r", str(base), str(out)]),
        Variant("cli", "lorafuse merge BASE LORA", merge_cli, max_x_cp=MAX_X_CP, **bound),
        Variant(
            "api",
            "lorafuse.merge(BASE, [LORA], OUT)",
            [sys.executable, "-c", API_SCRIPT, str(base), str(adapter), str(out)],
            max_x_cp=MAX_X_CP,
            **bound,
        ),
    ]
    if dora is not None:
        dora_cli = [*cli, str(base), str(dora), "-o", str(out)]
        found.append(
            Variant("dora", "lorafuse merge BASE DORA", dora_cli, reference="cli", max_x_ref=MAX_X_LORA, **bound)
        )
    for kind, folder in (tuners or {}).items():
        tuner_cli = [*cli, str(base), str(folder), "-o", str(out)]
        found.append(
            Variant(
                kind,
                f"lorafuse merge BASE {kind.upper()}",
                tuner_cli,
                reference="cli",
                max_x_ref=MAX_X_LORA_TUNER,
                max_rss_mb=MAX_RSS_TUNER_MB,
            )
        )
    if not args.skip_peft:
        peft = [sys.executable, "-c", PEFT_SCRIPT, str(base)]
        found.append(Variant("peft", "PEFT merge_and_unload + save_pretrained", [*peft, str(adapter), str(out)]))
        if dora is not None:
            found.append(Variant("peft-dora", "the same, DoRA adapter", [*peft, str(dora), str(out)]))
    if args.variants:
        found += [
            Variant("no-prefill", "LORAFUSE_PREFILL=0 lorafuse merge", merge_cli, {"LORAFUSE_PREFILL": "0"}),
            Variant("1-math", "LORAFUSE_MATH_THREADS=1 lorafuse merge", merge_cli, {"LORAFUSE_MATH_THREADS": "1"}),
            Variant("torch-engine", "LORAFUSE_FASTPATH=0 lorafuse merge", merge_cli, {"LORAFUSE_FASTPATH": "0"}),
        ]
    if args.load:
        # The one-thread reference also pins the BLAS/OpenMP pools, so it is one thread whatever lorafuse reads.
        one = {"LORAFUSE_MATH_THREADS": "1", "LORAFUSE_CPUS": "1"}
        one |= {var: "1" for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        found += [
            Variant(
                "load",
                "lorafuse merge beside 1 busy process",
                merge_cli,
                load=True,
                reference="load-1thread",
                max_x_ref=MAX_X_ONE_THREAD,
                **bound,
            ),
            Variant("load-1thread", "the same, one thread", merge_cli, one, load=True),
        ]
    if args.only:
        wanted = {"cp -r", *args.only.split(",")}
        unknown = wanted - {v.name for v in found}
        if unknown:
            raise SystemExit(f"--only: no variant {', '.join(sorted(unknown))} (with these options)")
        wanted |= {v.reference for v in found if v.name in wanted and v.reference}
        found = [v for v in found if v.name in wanted]
    return found


def installed_source() -> str:
    """The text of the installed lorafuse package's Python files (without importing it)."""
    spec = importlib.util.find_spec("lorafuse")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lorafuse is not installed: pip install -e .")
    root = Path(next(iter(spec.submodule_search_locations)))
    return "\n".join(path.read_text(errors="replace") for path in sorted(root.rglob("*.py")))


def mark_unread_settings(found: list[Variant], source: str) -> None:
    """A variant whose every setting is a LORAFUSE_ variable lorafuse no longer reads would time the default again."""
    for variant in found:
        unread = [var for var in variant.env if var.startswith("LORAFUSE_") and var not in source]
        if unread and len(unread) == len(variant.env):
            variant.missing = f"{', '.join(unread)} not read by the installed lorafuse"
        elif unread:
            print(f"note: {variant.name}: {', '.join(unread)} not read by the installed lorafuse", flush=True)


def torch_imports(work: Path) -> dict[str, str]:
    """Whether `lorafuse --help`, the tiny example's CLI merge and its API merge import torch: ``no``, ``yes (by
    lorafuse/FILE:LINE < ...)`` (the innermost lorafuse frames of the first ``import torch``), or ``n/a`` with the
    reason when the command fails."""
    tiny = [str(TINY / "base"), str(TINY / "adapter")]
    checks = {
        "lorafuse --help": (RUN_CLI, ["--help"]),
        "lorafuse merge (tiny example)": (RUN_CLI, ["merge", *tiny, "-o", str(work / "cli-out")]),
        "lorafuse.merge() (tiny example)": (API_SCRIPT, [*tiny, str(work / "api-out")]),
    }
    facts: dict[str, str] = {}
    for k, (label, (script, argv)) in enumerate(checks.items()):
        report = work / f"torch-{k}.txt"
        proc = subprocess.run(
            [sys.executable, "-c", TORCH_WATCH + script, str(report), *argv], capture_output=True, text=True
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            facts[label] = f"n/a (failed: {tail[:160]})"
        else:
            facts[label] = f"yes (by {report.read_text()})" if report.exists() else "no"
    return facts


def summarise(variant: Variant, by_name: dict[str, Variant]) -> dict:
    """The variant's medians, ratios and target checks, as written to --json."""
    floor = by_name["cp -r"].runs
    x_cp = [s / floor[rep][0] for rep, (s, _, _) in variant.runs.items() if rep in floor]
    data: dict = {
        "what": variant.what,
        "command": variant.cmd,
        "env": variant.env,
        "load": variant.load,
        "n/a": None if variant.runs else variant.missing,
        "stopped": variant.missing if variant.runs else None,  # failed after some repetitions
        "runs": [
            {"repetition": rep + 1, "seconds": s, "peak_rss_bytes": rss, "cpu_seconds": cpu}
            for rep, (s, rss, cpu) in sorted(variant.runs.items())
        ],
    }
    if not variant.runs:
        return data
    data |= {
        "median_seconds": statistics.median(s for s, _, _ in variant.runs.values()),
        "x_cp_r": x_cp,
        "median_x_cp_r": statistics.median(x_cp) if x_cp else None,
        "peak_rss_mib": max(rss for _, rss, _ in variant.runs.values()) / 2**20,
        "median_cpu_seconds": statistics.median(cpu for _, _, cpu in variant.runs.values()),
    }
    if variant.reference:
        ref = by_name[variant.reference].runs
        x_ref = [s / ref[rep][0] for rep, (s, _, _) in variant.runs.items() if rep in ref]
        data |= {"reference": variant.reference, "x_reference": x_ref}
        data["median_x_reference"] = statistics.median(x_ref) if x_ref else None
    measured = {
        "x cp -r": data["median_x_cp_r"],
        f"x {variant.reference}": data.get("median_x_reference"),
        "MB peak RSS": data["peak_rss_mib"] * 2**20 / 1e6,
    }
    limits = {
        "x cp -r": variant.max_x_cp,
        f"x {variant.reference}": variant.max_x_ref,
        "MB peak RSS": variant.max_rss_mb,
    }
    data["targets"] = {
        f"{what} <= {limit}": measured[what] <= limit
        for what, limit in limits.items()
        if limit is not None and measured[what] is not None
    }
    return data


def print_table(summary: dict[str, dict]) -> None:
    print(
        f"\n{'variant':13s} {'x cp -r':>7s} {'min':>5s} {'max':>5s} {'median s':>8s} {'x ref':>20s} "
        f"{'peak RSS':>10s} {'CPU s':>6s}  targets (issue 10)"
    )
    for name, data in summary.items():
        if "median_seconds" not in data:
            print(f"{name:13s} n/a: {data['n/a']}")
            continue
        ratios = data["x_cp_r"]
        ref = (
            f"{data['median_x_reference']:.2f} ({data['reference']})"
            if data.get("median_x_reference") is not None
            else ""
        )
        targets = ", ".join(f"{label} {'ok' if ok else 'OVER'}" for label, ok in data.get("targets", {}).items())
        print(
            f"{name:13s} {data['median_x_cp_r']:7.2f} {min(ratios):5.2f} {max(ratios):5.2f} "
            f"{data['median_seconds']:8.2f} {ref:>20s} {data['peak_rss_mib']:6.0f} MiB "
            f"{data['median_cpu_seconds']:6.2f}  {targets}"
        )
        if data["stopped"]:
            print(f"{'':13s} (stopped: {data['stopped']})")


def git_revision() -> str | None:
    proc = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of layers (2: twice the model)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers before --scale (28: Qwen3-1.7B)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each command (alternating)")
    parser.add_argument("--skip-peft", action="store_true", help="do not run PEFT (slow, needs ~4 GB per scale)")
    parser.add_argument("--skip-dora", action="store_true", help="do not build or merge the DoRA adapter")
    parser.add_argument("--load", action="store_true", help="also merge beside one busy process, default vs 1 thread")
    parser.add_argument(
        "--variants", action="store_true", help="also merge without the prefill, with one math thread, torch engine"
    )
    parser.add_argument("--tuners", action="store_true", help="also merge LoHa, LoKr and IA3 adapters (issue 12)")
    parser.add_argument("--only", help="comma-separated variants to run (plus cp -r and their references)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()

    base, adapter = ensure_models(args.scale, args.layers)
    dora = None if args.skip_dora else ensure_dora_adapter(base, adapter)
    layers = args.layers * args.scale
    tuners = (
        {kind: ensure_tuner_adapter(kind, base.parent, linear_shapes(), layers) for kind in TUNERS}
        if args.tuners
        else {}
    )
    out = CACHE / f"merge-bench-out-{os.getpid()}"  # private: other benchmarks share bench/.cache
    found = build_variants(args, base, adapter, dora, out, tuners)
    mark_unread_settings(found, installed_source())
    by_name = {v.name: v for v in found}

    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"base {size / 1e9:.2f} GB ({layers} layers), adapter rank {RANK}, {args.repeat} repetitions", flush=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        facts = torch_imports(Path(work))
    for label, value in facts.items():
        print(f"imports torch: {label:34s} {value}")
    warm([base, adapter, *([dora] if dora else []), *tuners.values()])
    load_before = os.getloadavg()[0]

    for rep in range(args.repeat):
        for variant in found:
            if variant.missing:
                continue
            shutil.rmtree(out, ignore_errors=True)
            try:
                variant.runs[rep] = run_measured(variant.cmd, variant.env, load=variant.load)
            except CommandFailed as exc:
                if variant.name == "cp -r":
                    raise
                variant.missing = f"failed: {str(exc).strip().splitlines()[-1][:200]}"
                print(f"  rep {rep + 1} {variant.name:12s} {variant.missing}", flush=True)
                continue
            seconds, rss, cpu = variant.runs[rep]
            rss_mib = rss / 2**20
            print(
                f"  rep {rep + 1} {variant.name:12s} {seconds:7.2f} s  cpu {cpu:6.2f} s  peak RSS {rss_mib:6.0f} MiB",
                flush=True,
            )
    shutil.rmtree(out, ignore_errors=True)

    summary = {v.name: summarise(v, by_name) for v in found}
    load_after = os.getloadavg()[0]
    print(f"\nratios to `cp -r` (and to the reference) of the same repetition; medians over {args.repeat}")
    print_table(summary)
    print(
        f"1-min load average: {load_before:.1f} before timing, {load_after:.1f} at the end (other work inflates ratios)"
    )
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "lorafuse": importlib.metadata.version("lorafuse"),
            "git": git_revision(),
            "argv": sys.argv[1:],
            "cpus": len(os.sched_getaffinity(0)),
            "load_average": [load_before, load_after],
            "model": {"layers": layers, "bytes": size, "rank": RANK, "dora": dora is not None},
            "repetitions": args.repeat,
        }
        args.json.write_text(json.dumps({"meta": meta, "imports_torch": facts, "variants": summary}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
