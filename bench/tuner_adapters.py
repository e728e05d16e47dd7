"""LoHa, LoKr and IA3 adapters for the merge bench's model, written with numpy and safetensors as PEFT saves them.

Each adapter targets the layers the bench's LoRA targets (``shapes``: module name inside a decoder layer ->
(out, in), as ``merge_bench.linear_shapes()`` gives them), with every saved tensor non-zero (a trained adapter):

- ``loha``: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b``; ``r``/``alpha``.
- ``lokr``: PEFT's default layout for a Linear layer: ``lokr_w1`` (a, c) whole and ``lokr_w2_a`` (b, r) @
  ``lokr_w2_b`` (r, d), out = a*b and in = c*d split as PEFT's ``factorization`` splits them (the divisor pair
  nearest the square root), or ``lokr_w2`` whole where PEFT would keep it whole (r >= max(b, d) / 2).
- ``ia3``: ``ia3_l`` (out, 1) per layer, (1, in) for the feed-forward ones (``down_proj``, as PEFT's Qwen3
  default has it): a vector near 1.

Usage from merge_bench.py (the lead wires it in): ``ensure_tuner_adapter("loha", adapter.parent, linear_shapes(),
layers)`` builds ``<root>/adapter-loha`` once and returns it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PEFT_PREFIX = "base_model.model."
KINDS = ("loha", "lokr", "ia3")
FEEDFORWARD = ("down_proj",)  # PEFT's IA3 feed-forward module for Qwen3 (it scales inputs, not outputs)


def _split(dimension: int) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension, m the largest divisor up to the square root: PEFT's LoKr split with
    its default decompose_factor -1."""
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def _module_tensors(
    kind: str, name: str, out: int, inp: int, rank: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One module's saved tensors (names after the module's key)."""
    if kind == "loha":
        return {
            "hada_w1_a": _normal(rng, out, rank, scale=0.1),
            "hada_w1_b": _normal(rng, rank, inp, scale=inp**-0.5),
            "hada_w2_a": _normal(rng, out, rank, scale=0.1),
            "hada_w2_b": _normal(rng, rank, inp, scale=inp**-0.5),
        }
    if kind == "lokr":
        (a, b), (c, d) = _split(out), _split(inp)
        tensors = {"lokr_w1": _normal(rng, a, c, scale=0.1)}
        if rank >= max(b, d) / 2:
            tensors["lokr_w2"] = _normal(rng, b, d, scale=0.1)
        else:
            tensors["lokr_w2_a"] = _normal(rng, b, rank, scale=0.1)
            tensors["lokr_w2_b"] = _normal(rng, rank, d, scale=d**-0.5)
        return tensors
    if kind == "ia3":
        shape = (1, inp) if name.endswith(FEEDFORWARD) else (out, 1)
        return {"ia3_l": 1 + _normal(rng, *shape, scale=0.05)}
    raise ValueError(f"unknown tuner kind {kind!r}: one of {', '.join(KINDS)}")


def _config(kind: str, modules: list[str], rank: int, alpha: float) -> dict:
    common = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "Qwen/Qwen3-1.7B",
        "target_modules": modules,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if kind == "ia3":
        return {
            **common,
            "peft_type": "IA3",
            "feedforward_modules": [m for m in modules if m in FEEDFORWARD],
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
    lycoris = {"r": rank, "alpha": alpha, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}
    lycoris |= {"rank_pattern": {}, "alpha_pattern": {}, "use_effective_conv2d": False}
    if kind == "loha":
        return {**common, **lycoris, "peft_type": "LOHA"}
    return {**common, **lycoris, "peft_type": "LOKR", "decompose_both": False, "decompose_factor": -1}


def build_tuner_adapter(
    kind: str,
    folder: Path,
    shapes: dict[str, tuple[int, int]],
    layers: int,
    rank: int = 16,
    alpha: float = 32,
    seed: int = 5,
) -> Path:
    """Write a ``kind`` adapter ("loha", "lokr", "ia3") for ``layers`` decoder layers into ``folder``."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for i in range(layers):
        for name, (out, inp) in shapes.items():
            key = f"{PEFT_PREFIX}model.layers.{i}.{name}"
            for param, value in _module_tensors(kind, name, out, inp, rank, rng).items():
                tensors[f"{key}.{param}"] = value
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    modules = sorted({name.rpartition(".")[2] for name in shapes})
    (folder / "adapter_config.json").write_text(json.dumps(_config(kind, modules, rank, alpha), indent=2))
    return folder


def ensure_tuner_adapter(kind: str, root: Path, shapes: dict[str, tuple[int, int]], layers: int) -> Path:
    """``root/adapter-<kind>``, built once (``root/.complete-<kind>`` marks it done)."""
    folder, done = root / f"adapter-{kind}", root / f".complete-{kind}"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building its {kind} adapter in {folder} (once)", flush=True)
        build_tuner_adapter(kind, folder, shapes, layers)
        done.touch()
    return folder
