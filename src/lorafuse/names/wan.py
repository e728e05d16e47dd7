"""Wan (2.1, 2.2): the original layout (``blocks.N.self_attn.q``, ``ffn.0``, ``modulation``, optionally under
``model.diffusion_model.``) and diffusers' ``WanTransformer3DModel`` layout (``blocks.N.attn1.to_q``,
``ffn.net.0.proj``, ``scale_shift_table``), paired exactly as diffusers' ``convert_wan_transformer_to_diffusers``
renames them. No tensor is fused; the cross-attention norm is ``norm3`` in one layout and ``norm2`` in the other
(the other of the two holds no weights), and the modulations are bare parameters of a block and of the head.
"""

from __future__ import annotations

import re

from .layout import LayoutKind, register_layout
from .paired import DIFFUSERS, ORIGINAL, Pairing, pair

B, A1, A2 = "blocks.{n}.", "blocks.{n}.self_attn.", "blocks.{n}.cross_attn."
MODULATION = (("modulation", "scale_shift_table"),)
ATTENTION = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))
IMAGE_ATTENTION = (("k_img", "add_k_proj"), ("v_img", "add_v_proj"), ("norm_k_img", "norm_added_k"))

PAIRINGS: tuple[Pairing, ...] = (
    pair("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    pair("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    pair("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    pair("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    pair("time_projection.1", "condition_embedder.time_proj"),
    pair("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    pair("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    pair("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    pair("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    *(pair(A1 + o, B + "attn1." + d) for o, d in ATTENTION),
    *(pair(A2 + o, B + "attn2." + d) for o, d in ATTENTION + IMAGE_ATTENTION),
    pair(B + "norm3", B + "norm2"),
    pair(B + "norm2", B + "norm3"),
    pair(B + "ffn.0", B + "ffn.net.0.proj"),
    pair(B + "ffn.2", B + "ffn.net.2"),
    pair("blocks.{n}", "blocks.{n}", attrs=MODULATION),
    pair("head.head", "proj_out"),
    pair("head", "", attrs=MODULATION),
)

ORIGINAL_MARK = re.compile(r"(?:^|\.)blocks\.\d+\.self_attn\.q\.weight$")
DIFFUSERS_MARK = re.compile(r"(?:^|\.)blocks\.\d+\.attn1\.to_q\.weight$")
DIFFUSERS_FFN = re.compile(r"(?:^|\.)blocks\.\d+\.ffn\.net\.0\.proj\.weight$")


def _original(keys: list[str]) -> bool:
    return any(ORIGINAL_MARK.search(k) for k in keys) and any(".ffn.0.weight" in k for k in keys)


def _diffusers(keys: list[str]) -> bool:
    return any(DIFFUSERS_MARK.search(k) for k in keys) and any(DIFFUSERS_FFN.search(k) for k in keys)


WAN = register_layout(LayoutKind("wan", _original, PAIRINGS, ORIGINAL))
DIFFUSERS_WAN = register_layout(LayoutKind("wan-diffusers", _diffusers, PAIRINGS, DIFFUSERS))
