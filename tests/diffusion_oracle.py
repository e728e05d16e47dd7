"""Tiny random diffusers models and diffusers' own LoRA loading + fusing, the oracle of the diffusion LoRA tests
(tests/test_diffusion_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora
from transformers import CLIPTextConfig, CLIPTextModel


def tiny_unet() -> UNet2DConditionModel:
    """An SD-1.x-shaped UNet: cross-attention down/mid/up blocks, 1x1-conv proj_in/proj_out, resnets."""
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    config.vocab_size = 100
    return CLIPTextModel(config)


def tiny_vae() -> AutoencoderKL:
    """A one-block VAE with 4 latent channels (a pipeline's, never merged into)."""
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )


def fused_unet(base: Path, lora: Path, prefix: str | None = "unet") -> dict[str, torch.Tensor]:
    """diffusers' merge of ``lora`` into the UNet folder ``base``: its loader reads the file (kohya names and the
    metadata included), fuse_lora folds the LoRA in. ``prefix`` None: a model's own ``save_lora_adapter`` file."""
    unet = UNet2DConditionModel.from_pretrained(base)
    if prefix is None:
        unet.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix=None)
    else:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(lora), return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    unet.fuse_lora()
    unet.unload_lora()
    return {k: v.detach() for k, v in unet.state_dict().items()}


def fused_sdxl_unet(base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """diffusers' merge of the SDXL LoRA file ``lora`` (kohya names included: the loader maps SGM block names with
    the UNet's config) into the UNet folder ``base``."""
    unet = UNet2DConditionModel.from_pretrained(base)
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(lora), unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet)
    unet.fuse_lora()
    unet.unload_lora()
    return {k: v.detach() for k, v in unet.state_dict().items()}


def fused_text_encoder(base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """diffusers' merge of the text-encoder part of pipeline LoRA file ``lora`` into the CLIP folder ``base``."""
    te = CLIPTextModel.from_pretrained(base)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(lora), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, te, prefix="text_encoder", metadata=metadata)
    fuse_text_encoder_lora(te)
    _remove_text_encoder_monkey_patch(te)
    return {k: v.detach() for k, v in te.state_dict().items()}


def assert_merged_as(merged: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """``merged`` holds the base's tensors, equal to the oracle's ``want``, which changed some of them."""
    assert any(not torch.equal(want[k], base[k]) for k in base), "the oracle changed nothing: the test proves nothing"
    assert set(merged) == set(base)
    for name in base:
        torch.testing.assert_close(merged[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """fp32 values of std 0.1 for every tensor of ``shapes`` (a checkpoint in a model's original layout)."""
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same tensor names, and values equal to fp32 rounding."""
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].float(), value.float(), rtol=1e-5, atol=1e-6, msg=key)
