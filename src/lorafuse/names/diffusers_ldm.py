"""Stable Diffusion UNets (SD 1.x/2.x, SDXL): the original (LDM / SGM) layout of single-file checkpoints
(``input_blocks.N.M``, ``middle_block``, ``output_blocks``, under ``model.diffusion_model.``) and diffusers'
``UNet2DConditionModel`` layout (``down_blocks.i.resnets.j``, ``mid_block``, ``up_blocks``), paired exactly as
diffusers' ``convert_ldm_unet_checkpoint`` (loaders/single_file_utils.py) renames them: with L layers per block,
``input_blocks.{1 + i(L+1) + j}.0``/``.1`` are down block i's resnet/attention j and ``input_blocks.{(i+1)(L+1)}.0.op``
its downsampler; ``output_blocks.{i(L+1) + j}`` up block i's, its upsampler the ``.conv`` after the resnet (and the
attention, where the block has one); resnets rename their layers (``in_layers.0`` -> ``norm1``, ...), attentions
keep theirs. No tensor is fused.

The tables are SD's and SDXL's (two layers per block; attentions in down blocks 0-2 / 1-2): a checkpoint is one of
them only when its block structure says so, so no name lands on the block of another structure.

The OpenCLIP text encoders of SD 2.x (``cond_stage_model.model.transformer``) and SDXL (text encoder 2,
``conditioner.embedders.1.model.transformer``) pair with transformers' CLIP names as diffusers'
``convert_open_clip_checkpoint`` splits them: ``resblocks.N.attn.in_proj_weight`` holds q_proj, k_proj, v_proj in
three equal row blocks; ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj`` are ``layer_norm1``/``2``, ``fc1``/``fc2``.
"""

from __future__ import annotations

import re

from .layout import LayoutKind, register_layout
from .paired import DIFFUSERS, ORIGINAL, Pairing, Piece, pair

LAYERS = 2  # layers per block of every SD 1.x/2.x/SDXL UNet
RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
BLOCK_MODULES = tuple(
    f"transformer_blocks.{{n}}.{m}"
    for m in (
        *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
        "norm1",
        "norm2",
        "norm3",
        "ff.net.0.proj",
        "ff.net.2",
    )
)
ATTENTION = ("norm", "proj_in", "proj_out", *BLOCK_MODULES)


OPEN_CLIP, CLIP = "transformer.resblocks.{n}.", "text_model.encoder.layers.{n}."
OPEN_CLIP_PAIRINGS = (
    Pairing(
        OPEN_CLIP + "attn",
        tuple(Piece(f"{CLIP}self_attn.{p}_proj") for p in "qkv"),
        attrs=(("in_proj_weight", "weight"), ("in_proj_bias", "bias")),
    ),
    pair(OPEN_CLIP + "attn.out_proj", CLIP + "self_attn.out_proj"),
    pair(OPEN_CLIP + "ln_1", CLIP + "layer_norm1"),
    pair(OPEN_CLIP + "ln_2", CLIP + "layer_norm2"),
    pair(OPEN_CLIP + "mlp.c_fc", CLIP + "mlp.fc1"),
    pair(OPEN_CLIP + "mlp.c_proj", CLIP + "mlp.fc2"),
)


def _resnet(original: str, diffusers: str) -> list[Pairing]:
    return [pair(f"{original}.{o}", f"{diffusers}.{d}") for o, d in RESNET]


def _attention(original: str, diffusers: str) -> list[Pairing]:
    return [pair(f"{original}.{m}", f"{diffusers}.{m}") for m in ATTENTION]


def unet_pairings(down_attention: tuple[bool, ...], up_attention: tuple[bool, ...], sdxl: bool) -> tuple[Pairing, ...]:
    """The pairings of a UNet with these down/up blocks (whether each has attentions), as the converter pairs them."""
    found = [
        pair("time_embed.0", "time_embedding.linear_1"),
        pair("time_embed.2", "time_embedding.linear_2"),
        pair("input_blocks.0.0", "conv_in"),
        pair("out.0", "conv_norm_out"),
        pair("out.2", "conv_out"),
    ]
    if sdxl:
        found += [pair("label_emb.0.0", "add_embedding.linear_1"), pair("label_emb.0.2", "add_embedding.linear_2")]
    for i, attention in enumerate(down_attention):
        for j in range(LAYERS):
            block = f"input_blocks.{1 + i * (LAYERS + 1) + j}"
            found += _resnet(f"{block}.0", f"down_blocks.{i}.resnets.{j}")
            if attention:
                found += _attention(f"{block}.1", f"down_blocks.{i}.attentions.{j}")
        if i < len(down_attention) - 1:
            found.append(pair(f"input_blocks.{(i + 1) * (LAYERS + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
    found += _resnet("middle_block.0", "mid_block.resnets.0")
    found += _attention("middle_block.1", "mid_block.attentions.0")
    found += _resnet("middle_block.2", "mid_block.resnets.1")
    for i, attention in enumerate(up_attention):
        for j in range(LAYERS + 1):
            block = f"output_blocks.{i * (LAYERS + 1) + j}"
            found += _resnet(f"{block}.0", f"up_blocks.{i}.resnets.{j}")
            if attention:
                found += _attention(f"{block}.1", f"up_blocks.{i}.attentions.{j}")
        if i < len(up_attention) - 1:
            last = f"output_blocks.{i * (LAYERS + 1) + LAYERS}"
            found.append(pair(f"{last}.{2 if attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    return tuple(found)


SD_PAIRINGS = unet_pairings((True, True, True, False), (False, True, True, True), sdxl=False) + OPEN_CLIP_PAIRINGS
SDXL_PAIRINGS = unet_pairings((False, True, True), (True, True, False), sdxl=True) + OPEN_CLIP_PAIRINGS


def _has(keys: list[str], pattern: str) -> bool:
    regex = re.compile(rf"(?:^|\.){pattern}")
    return any(regex.search(k) for k in keys)


def _original(keys: list[str], sdxl: bool) -> bool:
    """An LDM UNet of two layers per block (its first downsampler in input block 3) with SD's or SDXL's attentions."""
    if not (_has(keys, r"input_blocks\.3\.0\.op\.weight$") and _has(keys, r"middle_block\.1\.proj_in\.weight$")):
        return False
    first_attention = _has(keys, r"input_blocks\.1\.1\.proj_in\.weight$")
    return (not first_attention and _has(keys, r"input_blocks\.4\.1\.proj_in\.weight$")) if sdxl else first_attention


def _diffusers(keys: list[str], sdxl: bool) -> bool:
    """A diffusers UNet of two layers per block with SD's or SDXL's attentions."""
    if not (_has(keys, r"down_blocks\.0\.resnets\.1\.conv1\.weight$") and _has(keys, r"mid_block\.attentions\.0\.")):
        return False
    if _has(keys, r"down_blocks\.0\.resnets\.2\."):
        return False
    first_attention = _has(keys, r"down_blocks\.0\.attentions\.0\.proj_in\.weight$")
    return (not first_attention and _has(keys, r"down_blocks\.1\.attentions\.0\.proj_in")) if sdxl else first_attention


SDXL_LDM = register_layout(LayoutKind("sdxl-ldm", lambda k: _original(k, True), SDXL_PAIRINGS, ORIGINAL))
SD_LDM = register_layout(LayoutKind("sd-ldm", lambda k: _original(k, False), SD_PAIRINGS, ORIGINAL))
SDXL_DIFFUSERS = register_layout(LayoutKind("sdxl-diffusers", lambda k: _diffusers(k, True), SDXL_PAIRINGS, DIFFUSERS))
SD_DIFFUSERS = register_layout(LayoutKind("sd-diffusers", lambda k: _diffusers(k, False), SD_PAIRINGS, DIFFUSERS))
