"""Diffusion merge benchmark: `lorafuse merge` of a kohya LoRA into an SDXL-shaped single-file checkpoint against
`cp` of the same checkpoint, alternating, in one run.

Builds once (cached under bench/.cache/) a random fp16 checkpoint with the tensor names and shapes of an SDXL LDM
file (``model.diffusion_model.*`` UNet, ``conditioner.embedders.0.transformer.*`` CLIP-L,
``conditioner.embedders.1.model.*`` OpenCLIP bigG, ``first_stage_model.*`` VAE), written from a header table with
numpy (no model is instantiated), and a kohya rank-32 LoRA on the UNet's transformer layers and both text
encoders, with the names kohya writes for SDXL (UNet: the flattened LDM names, ``lora_unet_input_blocks_4_1_...``;
text encoders: transformers' CLIP names, ``lora_te1_text_model_...``, ``lora_te2_text_model_...``, whose q, k, v
land in row thirds of OpenCLIP's fused ``in_proj_weight``: names/diffusers_ldm.py). Each repetition runs `cp` and
the merge once, each as a subprocess measured alone (bench/_common.py), with a warm page cache. Usage::

    python bench/diffusion_bench.py [--repeat 3] [--depth 1.0] [--json FILE]

``--depth 0.2`` keeps a fifth of the transformer blocks and text-encoder layers (a quick run; the names and
widths stay SDXL's). Targets (issue 16): merge at most 1.5x `cp`, peak RSS at most 300 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, lorafuse_command, run_measured, warm  # noqa: E402

MAX_X_CP = 1.5
MAX_RSS_MB = 300
RANK, ALPHA = 32, 16.0

# SDXL's UNet (sgm's UNetModel config in sd_xl_base.yaml): widths per level, transformer depth per level.
CHANNELS = (320, 640, 1280)
DEPTHS = (0, 2, 10)
MIDDLE_DEPTH = 10
RES_BLOCKS = 2
CONTEXT, TIME, ADM = 2048, 1280, 2816
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."
VAE = "first_stage_model."
TE2_KOHYA = "lora_te2_text_model_"  # kohya's text encoder 2 names: transformers' CLIP, whatever the checkpoint

Table = dict[str, tuple[int, ...]]


def _resblock(table: Table, name: str, cin: int, cout: int) -> None:
    table.update(
        {
            f"{name}.in_layers.0.weight": (cin,),
            f"{name}.in_layers.0.bias": (cin,),
            f"{name}.in_layers.2.weight": (cout, cin, 3, 3),
            f"{name}.in_layers.2.bias": (cout,),
            f"{name}.emb_layers.1.weight": (cout, TIME),
            f"{name}.emb_layers.1.bias": (cout,),
            f"{name}.out_layers.0.weight": (cout,),
            f"{name}.out_layers.0.bias": (cout,),
            f"{name}.out_layers.3.weight": (cout, cout, 3, 3),
            f"{name}.out_layers.3.bias": (cout,),
        }
    )
    if cin != cout:
        table.update({f"{name}.skip_connection.weight": (cout, cin, 1, 1), f"{name}.skip_connection.bias": (cout,)})


def _transformer(table: Table, name: str, ch: int, depth: int, lora: list[tuple[str, int, int]]) -> None:
    """A SpatialTransformer with linear projections (SDXL's use_linear_in_transformer); its linear layers go into
    ``lora`` as (module, out, in)."""
    table.update({f"{name}.norm.weight": (ch,), f"{name}.norm.bias": (ch,)})
    linears = [("proj_in", ch, ch, True), ("proj_out", ch, ch, True)]
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        linears += [
            (f"{block}.attn1.to_q", ch, ch, False),
            (f"{block}.attn1.to_k", ch, ch, False),
            (f"{block}.attn1.to_v", ch, ch, False),
            (f"{block}.attn1.to_out.0", ch, ch, True),
            (f"{block}.ff.net.0.proj", 8 * ch, ch, True),
            (f"{block}.ff.net.2", ch, 4 * ch, True),
            (f"{block}.attn2.to_q", ch, ch, False),
            (f"{block}.attn2.to_k", ch, CONTEXT, False),
            (f"{block}.attn2.to_v", ch, CONTEXT, False),
            (f"{block}.attn2.to_out.0", ch, ch, True),
        ]
        for norm in ("norm1", "norm2", "norm3"):
            table.update({f"{name}.{block}.{norm}.weight": (ch,), f"{name}.{block}.{norm}.bias": (ch,)})
    for module, out, inp, bias in linears:
        table[f"{name}.{module}.weight"] = (out, inp)
        if bias:
            table[f"{name}.{module}.bias"] = (out,)
        lora.append((f"{UNET}{name}.{module}", out, inp))


def unet_table(depth_scale: float, lora: list[tuple[str, int, int]]) -> Table:
    """SDXL's LDM UNet tensor names and shapes (``model.diffusion_model.`` prefix), in file order."""

    def depth(d: int) -> int:
        return max(1, round(d * depth_scale)) if d else 0

    t: Table = {
        "time_embed.0.weight": (TIME, CHANNELS[0]),
        "time_embed.0.bias": (TIME,),
        "time_embed.2.weight": (TIME, TIME),
        "time_embed.2.bias": (TIME,),
        "label_emb.0.0.weight": (TIME, ADM),
        "label_emb.0.0.bias": (TIME,),
        "label_emb.0.2.weight": (TIME, TIME),
        "label_emb.0.2.bias": (TIME,),
        "input_blocks.0.0.weight": (CHANNELS[0], 4, 3, 3),
        "input_blocks.0.0.bias": (CHANNELS[0],),
    }
    skips, ch, index = [CHANNELS[0]], CHANNELS[0], 1
    for level, (width, d) in enumerate(zip(CHANNELS, DEPTHS)):
        for _ in range(RES_BLOCKS):
            _resblock(t, f"input_blocks.{index}.0", ch, width)
            ch = width
            if d:
                _transformer(t, f"input_blocks.{index}.1", ch, depth(d), lora)
            skips.append(ch)
            index += 1
        if level < len(CHANNELS) - 1:
            t.update({f"input_blocks.{index}.0.op.weight": (ch, ch, 3, 3), f"input_blocks.{index}.0.op.bias": (ch,)})
            skips.append(ch)
            index += 1
    _resblock(t, "middle_block.0", ch, ch)
    _transformer(t, "middle_block.1", ch, depth(MIDDLE_DEPTH), lora)
    _resblock(t, "middle_block.2", ch, ch)
    index = 0
    for level in reversed(range(len(CHANNELS))):
        width, d = CHANNELS[level], DEPTHS[level]
        for j in range(RES_BLOCKS + 1):
            _resblock(t, f"output_blocks.{index}.0", ch + skips.pop(), width)
            ch, part = width, 1
            if d:
                _transformer(t, f"output_blocks.{index}.1", ch, depth(d), lora)
                part = 2
            if level and j == RES_BLOCKS:
                up = f"output_blocks.{index}.{part}.conv"
                t.update({f"{up}.weight": (ch, ch, 3, 3), f"{up}.bias": (ch,)})
            index += 1
    t.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (4, ch, 3, 3), "out.2.bias": (4,)})
    return {UNET + k: v for k, v in t.items()}


def clip_l_table(layers: int, lora: list[tuple[str, int, int]]) -> Table:
    """CLIP ViT-L/14's text model as SDXL files hold it (``conditioner.embedders.0.transformer.text_model.``)."""
    h = 768
    t: Table = {"embeddings.token_embedding.weight": (49408, h), "embeddings.position_embedding.weight": (77, h)}
    for i in range(layers):
        layer = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{layer}.self_attn.{proj}.weight"], t[f"{layer}.self_attn.{proj}.bias"] = (h, h), (h,)
            lora.append((f"{TE1}{layer}.self_attn.{proj}", h, h))
        t.update({f"{layer}.layer_norm1.weight": (h,), f"{layer}.layer_norm1.bias": (h,)})
        t.update({f"{layer}.mlp.fc1.weight": (4 * h, h), f"{layer}.mlp.fc1.bias": (4 * h,)})
        t.update({f"{layer}.mlp.fc2.weight": (h, 4 * h), f"{layer}.mlp.fc2.bias": (h,)})
        t.update({f"{layer}.layer_norm2.weight": (h,), f"{layer}.layer_norm2.bias": (h,)})
        lora += [(f"{TE1}{layer}.mlp.fc1", 4 * h, h), (f"{TE1}{layer}.mlp.fc2", h, 4 * h)]
    t.update({"final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,)})
    return {TE1 + k: v for k, v in t.items()}


def open_clip_g_table(layers: int, lora: list[tuple[str, int, int]]) -> Table:
    """OpenCLIP ViT-bigG/14's text model as SDXL files hold it (``conditioner.embedders.1.model.``, fused
    ``in_proj_weight``)."""
    h = 1280
    t: Table = {"token_embedding.weight": (49408, h), "positional_embedding": (77, h)}
    for i in range(layers):
        block = f"transformer.resblocks.{i}"
        t.update({f"{block}.ln_1.weight": (h,), f"{block}.ln_1.bias": (h,)})
        t.update({f"{block}.attn.in_proj_weight": (3 * h, h), f"{block}.attn.in_proj_bias": (3 * h,)})
        t.update({f"{block}.attn.out_proj.weight": (h, h), f"{block}.attn.out_proj.bias": (h,)})
        t.update({f"{block}.ln_2.weight": (h,), f"{block}.ln_2.bias": (h,)})
        t.update({f"{block}.mlp.c_fc.weight": (4 * h, h), f"{block}.mlp.c_fc.bias": (4 * h,)})
        t.update({f"{block}.mlp.c_proj.weight": (h, 4 * h), f"{block}.mlp.c_proj.bias": (h,)})
        # kohya names text encoder 2's modules as transformers' CLIP does (q, k, v: row thirds of in_proj)
        te2 = f"{TE2_KOHYA}encoder_layers_{i}_"
        lora += [(f"{te2}self_attn_{p}_proj", h, h) for p in ("q", "k", "v", "out")]
        lora += [(f"{te2}mlp_fc1", 4 * h, h), (f"{te2}mlp_fc2", h, 4 * h)]
    t.update({"ln_final.weight": (h,), "ln_final.bias": (h,), "text_projection": (h, h), "logit_scale": ()})
    return {TE2 + k: v for k, v in t.items()}


def vae_table() -> Table:
    """The SDXL VAE's convolutions (``first_stage_model.``): untouched by the LoRA, copied by the merge."""
    t: Table = {}
    widths = (128, 256, 512, 512)
    for side, blocks in (("encoder.down", 2), ("decoder.up", 3)):
        for level, width in enumerate(widths):
            cin = widths[max(level - 1, 0)] if side == "encoder.down" else width
            for b in range(blocks):
                name = f"{side}.{level}.block.{b}"
                t.update(
                    {f"{name}.conv1.weight": (width, cin if b == 0 else width, 3, 3), f"{name}.conv1.bias": (width,)}
                )
                t.update({f"{name}.conv2.weight": (width, width, 3, 3), f"{name}.conv2.bias": (width,)})
    return {VAE + k: v for k, v in t.items()}


def lora_name(module: str) -> str:
    """kohya's flattened name of an LDM module (its prefix says the part); text encoder 2's are kohya's already."""
    if module.startswith(TE2_KOHYA):
        return module
    for prefix, part in ((UNET, "lora_unet_"), (TE1, "lora_te1_text_model_")):
        if module.startswith(prefix):
            return part + module[len(prefix) :].replace(".", "_")
    raise ValueError(module)


def write_safetensors(path: Path, table: dict[str, tuple[tuple[int, ...], str]], fill: Iterator[np.ndarray]) -> int:
    """A safetensors file of ``table`` (name -> (shape, dtype code)), its values from ``fill`` in table order,
    written tensor by tensor (never the whole model in memory); returns its size."""
    sizes = {"F16": 2, "F32": 4}
    header: dict[str, object] = {
        "__metadata__": {"format": "pt", "modelspec.architecture": "stable-diffusion-xl-v1-base"}
    }
    offset = 0
    for name, (shape, code) in table.items():
        end = offset + math.prod(shape) * sizes[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for (shape, code), values in zip(table.values(), fill):
            assert values.shape == tuple(shape), (values.shape, shape)
            handle.write(np.ascontiguousarray(values, dtype=np.float16 if code == "F16" else np.float32).tobytes())
    return path.stat().st_size


def ensure_models(depth: float) -> tuple[Path, Path]:
    """The random SDXL-shaped checkpoint and its kohya LoRA, built once per ``depth``."""
    root = CACHE / f"sdxl-d{depth:g}"
    base, lora, done = root / "sdxl.safetensors", root / "kohya_r32.safetensors", root / ".complete"
    if done.exists():
        return base, lora
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    modules: list[tuple[str, int, int]] = []
    te1_layers, te2_layers = max(1, round(12 * depth)), max(1, round(32 * depth))
    table = {
        **unet_table(depth, modules),
        **clip_l_table(te1_layers, modules),
        **open_clip_g_table(te2_layers, modules),
        **vae_table(),
    }
    print(f"building a random SDXL-shaped checkpoint ({len(table)} tensors) in {root} (once)", flush=True)
    rng = np.random.default_rng(0)

    def base_values() -> Iterator[np.ndarray]:
        for shape in table.values():
            yield (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    size = write_safetensors(base, {n: (s, "F16") for n, s in table.items()}, base_values())
    lora_table: dict[str, tuple[tuple[int, ...], str]] = {}
    for module, out, inp in modules:
        name = lora_name(module)
        lora_table[f"{name}.lora_down.weight"] = ((RANK, inp), "F16")
        lora_table[f"{name}.lora_up.weight"] = ((out, RANK), "F16")
        lora_table[f"{name}.alpha"] = ((), "F32")

    def lora_values() -> Iterator[np.ndarray]:
        for name, (shape, _code) in lora_table.items():
            if name.endswith(".alpha"):
                yield np.array(ALPHA, np.float32)
            elif name.endswith("lora_down.weight"):
                yield rng.standard_normal(shape, dtype=np.float32) / np.float32(shape[1] ** 0.5)
            else:
                yield rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)

    lora_size = write_safetensors(lora, lora_table, lora_values())
    print(f"  checkpoint {size / 1e9:.2f} GB, LoRA {len(modules)} modules {lora_size / 1e6:.0f} MB", flush=True)
    done.touch()
    return base, lora


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--depth", type=float, default=1.0, help="fraction of SDXL's transformer depth (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    base, lora = ensure_models(args.depth)
    warm([base.parent])
    work = Path(tempfile.mkdtemp(prefix="diffusion-bench-", dir=os.environ.get("LORAFUSE_BENCH_TMP")))
    out = work / "merged.safetensors"
    variants = {
        "cp": ["cp", str(base), str(out)],
        "merge": [*lorafuse_command(), "merge", str(base), str(lora), "-o", str(out), "-q"],
    }
    runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in variants}
    try:
        for rep in range(args.repeat):
            for name, cmd in variants.items():
                if out.exists():
                    out.unlink()
                runs[name].append(run_measured(cmd))
                s, rss, cpu = runs[name][-1]
                print(f"rep {rep + 1} {name:6s} {s:7.2f} s  RSS {rss / 1e6:6.0f} MB  CPU {cpu:6.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [m[0] / c[0] for m, c in zip(runs["merge"], runs["cp"])]
    peak = max(r[1] for r in runs["merge"]) / 1e6
    result = {
        "checkpoint_bytes": base.stat().st_size,
        "lora_bytes": lora.stat().st_size,
        "depth": args.depth,
        "cpus": len(os.sched_getaffinity(0)),
        "cp_s": [r[0] for r in runs["cp"]],
        "merge_s": [r[0] for r in runs["merge"]],
        "merge_cpu_s": [r[2] for r in runs["merge"]],
        "x_cp": ratios,
        "x_cp_median": statistics.median(ratios),
        "merge_peak_rss_mb": peak,
        "targets": {"max_x_cp": MAX_X_CP, "max_rss_mb": MAX_RSS_MB},
    }
    print(
        f"merge / cp: median {result['x_cp_median']:.2f}x (target <= {MAX_X_CP}), "
        f"peak RSS {peak:.0f} MB (target <= {MAX_RSS_MB})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
