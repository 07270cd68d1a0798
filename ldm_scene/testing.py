"""Tiny random-weight models with SD v1.4's block layout, for fast tests.

The UNet keeps SD v1.4's block types and ``layers_per_block=2``, so it has the same 16
self-attention sites with the same module names; only channels, resolution and the text encoder's
size are small. Everything is built from configs in code (never downloaded or saved) and seeded
with an explicit generator, so two calls give identical weights. Imports nothing from
:mod:`ldm_scene.models` (which builds the tiny model from here): SD v1.4's layout comes from
:mod:`ldm_scene.sites`, the word-level tokenizer from :mod:`ldm_scene.tokenizer`.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, LMSDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .sites import SD14_UNET_CONFIG, SD_DOWN_BLOCKS, SD_SCHEDULER_CONFIG, SD_UP_BLOCKS
from .tokenizer import word_tokenizer

__all__ = ["SD14_UNET_CONFIG", "SD_DOWN_BLOCKS", "SD_UP_BLOCKS", "SD_SCHEDULER_CONFIG", "TINY_WORDS",
           "tiny_unet_config", "tiny_pipeline", "sd14_unet_empty"]

TINY_WORDS = "a an the on in of to with and photo red green blue cat dog cube sphere left right middle".split()


def tiny_unet_config(sample_size: int = 8, cross_attention_dim: int = 16) -> dict:
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 16, 16), down_block_types=SD_DOWN_BLOCKS, up_block_types=SD_UP_BLOCKS,
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4,
    )


def _seeded_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Re-draw every parameter from an explicit generator: the library constructors use the global
    # RNG, which tests must not depend on. Norm scales (the only 1-D weights) stay near 1: at ~0.02
    # every GroupNorm/LayerNorm shrank the signal 50x, so images came out flat grey and ignored the
    # prompt entirely.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise * 0.2)
            elif name.endswith("weight"):
                p.copy_(1 + noise * 0.1)
            else:
                p.copy_(noise * 0.02)
    return module.eval()


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight pipeline: 32x32 images, 8x8 latents, SD v1.4's 16 site names, in < 1 s."""
    unet = _seeded_init(UNet2DConditionModel(**tiny_unet_config()), seed)
    vae = _seeded_init(
        AutoencoderKL(
            block_out_channels=(8, 8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, sample_size=32,
        ),
        seed + 1,
    )
    tokenizer = word_tokenizer(TINY_WORDS, max_length=16)
    text_encoder = _seeded_init(
        CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            )
        ),
        seed + 2,
    )
    scheduler = LMSDiscreteScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sd14_unet_empty() -> UNet2DConditionModel:
    """SD v1.4's full-size UNet from its published config, with no weights allocated (meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return UNet2DConditionModel(**SD14_UNET_CONFIG)
