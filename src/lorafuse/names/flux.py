"""Flux: Black Forest Labs' single-file layout (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``,
optionally under ``model.diffusion_model.``) and diffusers' ``FluxTransformer2DModel`` layout (separate ``to_q``,
``to_k``, ``to_v``, ``proj_mlp``), paired exactly as diffusers' single-file converter
(``convert_flux_transformer_checkpoint_to_diffusers``) pairs them.

BFL's fused ``qkv`` holds q, k, v in thirds; ``linear1`` holds q, k, v (the hidden size each) then the MLP's input
rows; ``final_layer.adaLN_modulation.1`` stores (shift, scale) where diffusers' ``norm_out.linear`` stores (scale,
shift). A diffusers LoRA merges into those rows of a BFL checkpoint, and a BFL-named LoRA (kohya, musubi-tuner,
``diffusion_model.``) into a diffusers folder by its rows: a LoRA's B splits by rows, its A is shared.
"""

from __future__ import annotations

import re

from .layout import LayoutKind, register_layout
from .paired import DIFFUSERS, ORIGINAL, Pairing, Piece, pair

NORM_ATTRS = (("scale", "weight"),)  # BFL's RMSNorm keeps its weight as ``scale``
D = "transformer_blocks.{n}."
S = "single_transformer_blocks.{n}."

PAIRINGS: tuple[Pairing, ...] = (
    pair("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    pair("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    pair("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    pair("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    pair("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    pair("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    pair("txt_in", "context_embedder"),
    pair("img_in", "x_embedder"),
    pair("double_blocks.{n}.img_mod.lin", D + "norm1.linear"),
    pair("double_blocks.{n}.txt_mod.lin", D + "norm1_context.linear"),
    pair("double_blocks.{n}.img_attn.qkv", D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"),
    pair("double_blocks.{n}.txt_attn.qkv", D + "attn.add_q_proj", D + "attn.add_k_proj", D + "attn.add_v_proj"),
    pair("double_blocks.{n}.img_attn.norm.query_norm", D + "attn.norm_q", attrs=NORM_ATTRS),
    pair("double_blocks.{n}.img_attn.norm.key_norm", D + "attn.norm_k", attrs=NORM_ATTRS),
    pair("double_blocks.{n}.txt_attn.norm.query_norm", D + "attn.norm_added_q", attrs=NORM_ATTRS),
    pair("double_blocks.{n}.txt_attn.norm.key_norm", D + "attn.norm_added_k", attrs=NORM_ATTRS),
    pair("double_blocks.{n}.img_mlp.0", D + "ff.net.0.proj"),
    pair("double_blocks.{n}.img_mlp.2", D + "ff.net.2"),
    pair("double_blocks.{n}.txt_mlp.0", D + "ff_context.net.0.proj"),
    pair("double_blocks.{n}.txt_mlp.2", D + "ff_context.net.2"),
    pair("double_blocks.{n}.img_attn.proj", D + "attn.to_out.0"),
    pair("double_blocks.{n}.txt_attn.proj", D + "attn.to_add_out"),
    pair("single_blocks.{n}.modulation.lin", S + "norm.linear"),
    pair("single_blocks.{n}.linear1", S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp", split="width"),
    pair("single_blocks.{n}.norm.query_norm", S + "attn.norm_q", attrs=NORM_ATTRS),
    pair("single_blocks.{n}.norm.key_norm", S + "attn.norm_k", attrs=NORM_ATTRS),
    pair("single_blocks.{n}.linear2", S + "proj_out"),
    pair("final_layer.linear", "proj_out"),
    # (shift, scale) in BFL's rows, (scale, shift) in diffusers'.
    Pairing("final_layer.adaLN_modulation.1", (Piece("norm_out.linear", 1, 2), Piece("norm_out.linear", 0, 2))),
)

BFL_MARK = re.compile(r"(?:^|\.)(?:double_blocks\.\d+\.img_attn\.qkv|single_blocks\.\d+\.linear1)\.weight$")
DIFFUSERS_MARK = re.compile(r"(?:^|\.)single_transformer_blocks\.\d+\.proj_mlp\.weight$")


def _has(mark: re.Pattern[str]):
    return lambda keys: any(mark.search(k) for k in keys)


BFL = register_layout(LayoutKind("flux-bfl", _has(BFL_MARK), PAIRINGS, ORIGINAL))
DIFFUSERS_FLUX = register_layout(LayoutKind("flux-diffusers", _has(DIFFUSERS_MARK), PAIRINGS, DIFFUSERS))
