"""The site table against SD v1.4's real architecture (empty weights) and the tiny test UNet."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from ldm_scene.capture import hook_sites
from ldm_scene.sites import SITE_KEYS, UP_SITE_KEYS, SiteInfo, module_path, site_table
from ldm_scene.sites import SD14_UNET_CONFIG, SD_VAE_FACTOR
from ldm_scene.testing import tiny_unet_config

# DESIGN.md §2, written out independently of the code: (grid side at 512 px, channels).
DESIGN_TABLE_512 = {
    "down_blocks.0.attentions.0": (64, 320), "down_blocks.0.attentions.1": (64, 320),
    "down_blocks.1.attentions.0": (32, 640), "down_blocks.1.attentions.1": (32, 640),
    "down_blocks.2.attentions.0": (16, 1280), "down_blocks.2.attentions.1": (16, 1280),
    "mid_block.attentions.0": (8, 1280),
    "up_blocks.1.attentions.0": (16, 1280), "up_blocks.1.attentions.1": (16, 1280),
    "up_blocks.1.attentions.2": (16, 1280),
    "up_blocks.2.attentions.0": (32, 640), "up_blocks.2.attentions.1": (32, 640),
    "up_blocks.2.attentions.2": (32, 640),
    "up_blocks.3.attentions.0": (64, 320), "up_blocks.3.attentions.1": (64, 320),
    "up_blocks.3.attentions.2": (64, 320),
}


def test_sixteen_unique_sites_in_depth_order_and_nine_up_sites():
    assert len(SITE_KEYS) == len(set(SITE_KEYS)) == 16
    assert list(SITE_KEYS) == list(DESIGN_TABLE_512)  # DESIGN.md lists them in network-depth order
    assert UP_SITE_KEYS == SITE_KEYS[7:] and len(UP_SITE_KEYS) == 9  # the paper's intervention sites
    assert module_path("mid_block.attentions.0") == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert module_path("mid_block.attentions.0", "attn2") == "mid_block.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(KeyError, match="unknown attention layer 'ff'"):
        module_path("mid_block.attentions.0", "ff")
    with pytest.raises(KeyError, match="unknown site 'up_blocks.0.attentions.0'"):
        module_path("up_blocks.0.attentions.0")  # UpBlock2D has no attention


def test_sd14_paths_are_self_attention_with_design_channels(sd14_unet):
    assert next(sd14_unet.parameters()).device.type == "meta"  # no 3.4 GB allocated
    table = site_table(sd14_unet.config, 512, SD_VAE_FACTOR)
    assert [info.key for info in table] == list(SITE_KEYS)
    for info in table:
        module = sd14_unet.get_submodule(info.path)
        assert isinstance(module, Attention), info.path
        assert module.is_cross_attention is False, info.path
        side, channels = DESIGN_TABLE_512[info.key]
        assert (info.height, info.width, info.channels) == (side, side, channels), info.key
        # the module itself agrees: query and output projections have the table's width
        assert module.to_q.in_features == module.to_out[0].out_features == channels
        assert module.heads == 8  # SD v1.4's attention_head_dim=8 is diffusers' number of heads
        # and its sibling attn2 is the cross-attention over CLIP's 768-d tokens
        cross = sd14_unet.get_submodule(info.path[: -len("attn1")] + "attn2")
        assert cross.is_cross_attention and cross.to_k.in_features == 768


@pytest.mark.parametrize("latent_hw", [(64, 64), (96, 64)])
def test_sd14_token_counts_from_a_meta_forward_pass(sd14_unet, latent_hw):
    """Run the full-size UNet on the meta device: the hooked outputs have the table's [B, h*w, C]."""
    h, w = latent_hw
    table = {i.key: i for i in site_table(sd14_unet.config, (h * 8, w * 8), SD_VAE_FACTOR)}
    seen = []
    with hook_sites(sd14_unet, SITE_KEYS, lambda s, t, a: seen.append((s, tuple(a.shape))), split_guidance=False):
        sd14_unet(
            torch.empty(1, 4, h, w, device="meta"), torch.tensor(500, device="meta"),
            encoder_hidden_states=torch.empty(1, 77, 768, device="meta"),
        )
    assert [s for s, _ in seen] == list(SITE_KEYS)
    for site, shape in seen:
        assert shape == (1, table[site].height * table[site].width, table[site].channels), site


def test_grids_scale_with_image_size():
    cfg = SD14_UNET_CONFIG
    at768 = site_table(cfg, 768, SD_VAE_FACTOR)
    assert [i.height for i in at768] == [96, 96, 48, 48, 24, 24, 12, 24, 24, 24, 48, 48, 48, 96, 96, 96]
    assert all(i.height == i.width for i in at768)
    assert [i.channels for i in at768] == [c for _, c in DESIGN_TABLE_512.values()]  # channels don't move
    wide = site_table(cfg, (512, 768), SD_VAE_FACTOR)  # height, width
    assert [(i.height, i.width) for i in wide][:3] == [(64, 96), (64, 96), (32, 48)]
    assert wide[6].tokens == 8 * 12
    only = site_table(cfg, 512, SD_VAE_FACTOR, sites=["up_blocks.3.attentions.2", "mid_block.attentions.0"])
    assert [(i.key, i.tokens) for i in only] == [("up_blocks.3.attentions.2", 4096), ("mid_block.attentions.0", 64)]


def test_tiny_model_has_the_same_sixteen_sites(tiny_model):
    names = {name for name, _ in tiny_model.unet.named_modules()}
    for site in SITE_KEYS:
        module = tiny_model.unet.get_submodule(module_path(site))
        assert isinstance(module, Attention) and not module.is_cross_attention
    # and no other self-attention site exists in either model: the table is complete
    self_attn = sorted(n[: -len(".transformer_blocks.0.attn1")] for n in names if n.endswith("attn1"))
    assert self_attn == sorted(SITE_KEYS)
    table = tiny_model.sites()
    assert [(i.height, i.channels) for i in table][:7] == [(8, 8), (8, 8), (4, 16), (4, 16), (2, 16), (2, 16), (1, 16)]


def test_sd14_has_no_self_attention_outside_the_table(sd14_unet):
    found = sorted(n[: -len(".transformer_blocks.0.attn1")] for n, _ in sd14_unet.named_modules() if n.endswith("attn1"))
    assert found == sorted(SITE_KEYS)


def test_order_is_the_order_hooks_fire_not_named_modules(tiny_model):
    fired = []
    with hook_sites(tiny_model.unet, SITE_KEYS, lambda s, t, a: fired.append(s), split_guidance=False):
        with torch.no_grad():
            tiny_model.unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 16, 16))
    assert fired == list(SITE_KEYS)
    # named_modules() lists the mid block after the up blocks: why the order is written by hand
    listed = [n[: -len(".transformer_blocks.0.attn1")] for n, _ in tiny_model.unet.named_modules() if n.endswith("attn1")]
    assert sorted(listed) == sorted(SITE_KEYS) and listed != list(SITE_KEYS)
    assert listed[-1] == "mid_block.attentions.0"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(layers_per_block=1), "layers_per_block must be 2 as in SD v1.4, got 1"),
        (dict(block_out_channels=(32, 64, 64)), "UNet layout differs from SD v1.4's"),
        (dict(down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",)),
         r"UNet layout differs.*down=\('DownBlock2D'"),
        (dict(up_block_types=("UpBlock2D",) * 2 + ("CrossAttnUpBlock2D",) * 2), "UNet layout differs"),
    ],
    ids=["layers_per_block", "three-levels", "down-types", "up-types"],
)
def test_site_table_rejects_other_layouts(change, match):
    with pytest.raises(ValueError, match=match):
        site_table({**SD14_UNET_CONFIG, **change}, 512, SD_VAE_FACTOR)


@pytest.mark.parametrize(
    "size, match",
    [
        (500, r"image size 500x500 is not a multiple of the VAE factor 8"),
        ((512, 516), r"image size 512x516 is not a multiple of the VAE factor 8"),
        (520, r"latent size 65x65 must be divisible by 8"),  # 3 down-samplings of the latent
        ((512, 264), r"latent size 64x33 must be divisible by 8"),
    ],
)
def test_site_table_rejects_indivisible_sizes(size, match):
    with pytest.raises(ValueError, match=match):
        site_table(SD14_UNET_CONFIG, size, SD_VAE_FACTOR)


def test_tiny_config_sizes_come_from_the_config():
    table = site_table(tiny_unet_config(), 64, 4)  # a different VAE factor: 16x16 latent
    assert table[0].height == 16 and table[6].height == 2 and table[-1].channels == 8


def test_site_info_validates():
    assert SiteInfo("mid_block.attentions.0", "p", 1280, 8, 8).tokens == 64
    with pytest.raises(ValueError, match="unknown site"):
        SiteInfo("mid_block.attentions.1", "p", 1, 1, 1)
    with pytest.raises(ValueError, match="sizes must be positive"):
        SiteInfo("mid_block.attentions.0", "p", 0, 8, 8)
