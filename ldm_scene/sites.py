"""The self-attention sites that ldm-scene probes, and their sizes for a given model.

A *site* is one UNet self-attention layer, named by the key of the attention block that holds it
(``"down_blocks.0.attentions.0"``); the hooked module is that block's
``transformer_blocks.0.attn1`` (self-attention, after its output projection). The table is written
out by hand in network-depth order, because ``named_modules()`` lists the mid block after the up
blocks. Channels and grid sizes are derived from the UNet's config and the image size, never
hard-coded, so the same table serves SD v1.4, the toy model and the tiny test models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

#: SD v1.4's 16 self-attention sites, in the order the forward pass reaches them.
SITE_KEYS: tuple[str, ...] = (
    "down_blocks.0.attentions.0",
    "down_blocks.0.attentions.1",
    "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
)

#: The 9 decoder-side sites the paper's intervention edits.
UP_SITE_KEYS: tuple[str, ...] = tuple(k for k in SITE_KEYS if k.startswith("up_blocks"))

# --- SD v1.4 (DESIGN.md section 2): the one place its published layout is written down ---------
#: SD v1.4's UNet block types; the toy and tiny models keep them (same 16 site names).
SD_DOWN_BLOCKS: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP_BLOCKS: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
#: SD v1.4's published UNet config (the fields that define its architecture).
SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), down_block_types=SD_DOWN_BLOCKS, up_block_types=SD_UP_BLOCKS,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
#: SD v1.4's VAE: 512 px images -> 64x64 latents.
SD_VAE_FACTOR = 8
#: The paper's scheduler: LMS with SD v1.4's scaled-linear betas.
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1,
)

_HOOKED_SUFFIX = "transformer_blocks.0.attn1"
#: The attention layers of a site's transformer block that can be hooked: ``attn1`` (self-attention,
#: the probed activation) and ``attn2`` (cross-attention to the prompt), both after their output
#: projection and both ``[B, T, C]`` on the same token grid.
ATTENTION_LAYERS: tuple[str, ...] = ("attn1", "attn2")


def module_path(site: str, layer: str = "attn1") -> str:
    """Return the module path (relative to the UNet) of the layer hooked for ``site``
    (``layer="attn2"``: the same block's cross-attention)."""
    if site not in SITE_KEYS:
        raise KeyError(f"unknown site {site!r}; known sites: {', '.join(SITE_KEYS)}")
    if layer not in ATTENTION_LAYERS:
        raise KeyError(f"unknown attention layer {layer!r}; hookable: {', '.join(ATTENTION_LAYERS)}")
    return f"{site}.{_HOOKED_SUFFIX[: -len('attn1')]}{layer}"


@dataclass(frozen=True)
class SiteInfo:
    """One probed site for one model at one image size: module path, channels and token grid."""

    key: str
    path: str
    channels: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.key not in SITE_KEYS:
            raise ValueError(f"unknown site {self.key!r}")
        if min(self.channels, self.height, self.width) < 1:
            raise ValueError(f"site {self.key}: sizes must be positive, got {self}")

    @property
    def tokens(self) -> int:
        """Number of spatial tokens (height x width) the site's activation has per image."""
        return self.height * self.width


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from one side (a square) or a pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def site_table(
    unet_config: Mapping[str, Any],
    image_size: int | Sequence[int],
    vae_scale_factor: int,
    sites: Sequence[str] = SITE_KEYS,
) -> list[SiteInfo]:
    """Describe ``sites`` for a UNet config at an image size (pixels) and VAE down-scaling factor.

    Only UNets with SD v1.4's layout are supported: four resolution levels, cross-attention in the
    first three down blocks, the mid block and the last three up blocks, and
    ``layers_per_block == 2``. A config that differs raises ``ValueError`` saying what differs.
    """
    channels = tuple(unet_config["block_out_channels"])
    down_types = tuple(unet_config["down_block_types"])
    up_types = tuple(unet_config["up_block_types"])
    if len(channels) != 4 or down_types[:3] != ("CrossAttnDownBlock2D",) * 3 or up_types[1:] != (
        "CrossAttnUpBlock2D",
    ) * 3:
        raise ValueError(
            "UNet layout differs from SD v1.4's (4 levels, CrossAttn blocks at down 0-2 / up 1-3): "
            f"down={down_types}, up={up_types}, block_out_channels={channels}"
        )
    lpb = unet_config.get("layers_per_block", 2)
    if lpb != 2:
        raise ValueError(f"layers_per_block must be 2 as in SD v1.4, got {lpb}")
    img_h, img_w = as_hw(image_size)
    if img_h % vae_scale_factor or img_w % vae_scale_factor:
        raise ValueError(f"image size {img_h}x{img_w} is not a multiple of the VAE factor {vae_scale_factor}")
    lat_h, lat_w = img_h // vae_scale_factor, img_w // vae_scale_factor
    levels = len(channels) - 1
    if lat_h % 2**levels or lat_w % 2**levels:
        raise ValueError(f"latent size {lat_h}x{lat_w} must be divisible by {2**levels} for this UNet")

    def level_of(site: str) -> tuple[int, int]:
        # (resolution level, channels): level l has a grid of latent / 2**l.
        if site.startswith("mid_block"):
            return levels, channels[-1]
        block, index = site.split(".")[:2]
        if block == "down_blocks":
            return int(index), channels[int(index)]
        return levels - int(index), channels[::-1][int(index)]

    table = []
    for site in sites:
        level, ch = level_of(site)
        table.append(SiteInfo(site, module_path(site), ch, lat_h // 2**level, lat_w // 2**level))
    return table


def short_site_name(site: str | None) -> str:
    """A site key as tables and figures print it: ``up_blocks.2.attentions.1`` -> ``up2.1``, mid -> ``mid``."""
    if site is None:
        return "—"
    parts = site.split(".")
    if parts[0] == "mid_block":
        return "mid"
    return f"{parts[0].replace('_blocks', '')}{parts[1]}.{parts[3]}"
