"""Tiny random-weight models with SD v1.4's block layout, for fast tests.

The UNet keeps SD v1.4's block types and ``layers_per_block=2``, so it has the same 16
self-attention sites with the same module names; only channels, resolution and the text encoder's
size are small. Everything is built from configs in code (never downloaded or saved) and seeded
with an explicit generator, so two calls give identical weights. Imports nothing from
:mod:`ldm_scene.models` (which builds the tiny model from here): SD v1.4's layout comes from
:mod:`ldm_scene.sites`, the word-level tokenizer from :mod:`ldm_scene.tokenizer`.

For the app's tests: random probe folders that fit a model (:func:`random_banks`,
:func:`write_probe_dir`), a stand-in classifier (:class:`ColourClassifier`) and a PNG header that
lies about its size (:func:`png_header`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL, LMSDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from . import bundle
from .sites import SD14_UNET_CONFIG, SD_DOWN_BLOCKS, SD_SCHEDULER_CONFIG, SD_UP_BLOCKS, UP_SITE_KEYS
from .tokenizer import word_tokenizer

__all__ = ["SD14_UNET_CONFIG", "SD_DOWN_BLOCKS", "SD_UP_BLOCKS", "SD_SCHEDULER_CONFIG", "TINY_WORDS",
           "tiny_unet_config", "tiny_pipeline", "sd14_unet_empty", "APP_STEPS", "random_banks", "write_probe_dir",
           "ColourClassifier", "png_header"]

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


# --- for the app's tests ---------------------------------------------------------------------------

#: The tiny model's run length in the app tests.
APP_STEPS = 4


def foreground_banks(model, steps: int, seed: int = 0) -> dict:
    """A random foreground probe (no biases) and random class means (counts 3 and 1) for every
    (site, step) of ``model``: what the intervention methods read."""
    from .probes import ProbeBank, ProbeMeta, class_means_bank

    sites = {s.key: (s.channels, s.height, s.width) for s in model.sites()}
    meta = ProbeMeta("foreground", model.model_id, model.image_size, "LMSDiscreteScheduler", steps, sites)
    gen = torch.Generator().manual_seed(seed)
    weights = {(s, t): torch.randn(2, c, generator=gen) for s, (c, _, _) in sites.items() for t in range(steps)}
    probe = ProbeBank(meta, weights)
    sums = {k: torch.randn(2, w.shape[1], generator=gen) for k, w in weights.items()}
    counts = {k: torch.tensor([3.0, 1.0]) for k in weights}
    return {"foreground": probe, "foreground_means": class_means_bank(sums, counts, probe)}


def random_banks(model, steps: int = APP_STEPS, seed: int = 0, model_id: str | None = None,
                 scheduler: str = "LMSDiscreteScheduler") -> dict:
    """Random probes for every (site, step) of ``model`` with metadata that fits it, plus class means."""
    from .probes import CLASS_MEANS, TASKS, ProbeBank, ProbeMeta, class_means_bank

    sites = {s.key: (s.channels, s.height, s.width) for s in model.sites()}
    gen = torch.Generator().manual_seed(seed)
    banks = {}
    norm = {"foreground": (0.0, 1.0), "depth": (12.0, 6.0), "shading": (0.6, 0.2)}
    for task in TASKS:
        k = 2 if task == "foreground" else 1
        meta = ProbeMeta(task, model_id or model.model_id, model.image_size, scheduler, steps, sites,
                         *norm[task], training={"method": "random", "seed": seed})
        weights = {(s, t): torch.randn(k, c, generator=gen) for s, (c, _, _) in sites.items() for t in range(steps)}
        biases = {key: torch.randn(k, generator=gen) * 0.5 for key in weights}
        banks[task] = ProbeBank(meta, weights, biases)
    fg = banks["foreground"]
    sums = {key: torch.randn(2, w.shape[1], generator=gen) for key, w in fg.weights.items()}
    counts = {key: torch.tensor([3.0, 1.0]) for key in fg.weights}
    banks[CLASS_MEANS] = class_means_bank(sums, counts, ProbeBank(fg.meta, fg.weights))
    return banks


def random_group_probe(model, steps: int = APP_STEPS, seed: int = 0, sites: tuple[str, ...] = UP_SITE_KEYS,
                       model_id: str | None = None, scheduler: str = "LMSDiscreteScheduler"):
    """A random foreground :class:`~ldm_scene.probes.GroupProbe` over ``sites`` of ``model`` at every
    step, with metadata that fits it (thresholds from 0.3 up to 0.7)."""
    from .probes import GroupProbe, ProbeMeta

    info = {s.key: (s.channels, s.height, s.width) for s in model.sites()}
    gen = torch.Generator().manual_seed(seed)
    channels = sum(info[s][0] for s in sites)
    meta = ProbeMeta("foreground", model_id or model.model_id, model.image_size, scheduler, steps,
                     {s: info[s] for s in sites},
                     training={"method": "random", "name": f"{len(sites)} test sites", "group": list(sites),
                               "thresholds": {str(k): 0.3 + 0.4 * k / steps for k in range(steps)}})
    weights = {k: torch.randn(1, channels, generator=gen) / channels ** 0.5 for k in range(steps)}
    biases = {k: torch.randn(1, generator=gen) * 0.1 + 0.3 for k in range(steps)}
    return GroupProbe(meta, weights, biases)


def write_probe_dir(model, folder: Path, steps: int = APP_STEPS, seed: int = 0, model_id: str | None = None,
                    scheduler: str = "LMSDiscreteScheduler", group: bool = False) -> Path:
    """A probe folder as the app expects one: banks, class means, metrics.json, a README and a figure
    (and with ``group``, a foreground probe over the up-block sites read together)."""
    from .probes import GROUP_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, bank in random_banks(model, steps, seed, model_id, scheduler).items():
        bank.save(folder / f"{name}.safetensors")
    if group:
        random_group_probe(model, steps, seed, model_id=model_id, scheduler=scheduler).save(folder / GROUP_FILE)
    # The layout ldm_scene.training writes: sites per step in best_site_per_step, their scores in best_per_step.
    metrics = {"steps": "0-based denoising-loop indices", "tasks": {
        "foreground": {"best_site": "up_blocks.3.attentions.0", "metric": "dice", "first_step_90pct": 2,
                       "best_site_per_step": [UP_SITE_KEYS[s % len(UP_SITE_KEYS)] for s in range(steps)],
                       "best_per_step": [0.5 + 0.3 * s / max(steps - 1, 1) for s in range(steps)]},
        "depth": {"best_site": "up_blocks.2.attentions.1", "metric": "spearman", "best_per_step": [0.9] * steps},
    }}
    bundle.metrics_path(folder).write_text(json.dumps(metrics))
    (folder / "README.md").write_text("# Probe results\n\n| task | dice |\n|---|---|\n| fg | 0.8 |\n\n![curves](emergence.png)\n")
    Image.new("RGB", (40, 30), (200, 100, 50)).save(folder / "emergence.png")
    return folder


class ColourClassifier:
    """A stand-in classifier (the Classifier protocol) that calls an image a cube when it is reddish."""

    name = "colour"
    classes = ("cube", "sphere")

    def probabilities(self, images):
        rows = []
        for image in images:
            rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
            red = float(rgb[..., 0].mean() - rgb[..., 1:].mean()) / 255
            p = 1 / (1 + np.exp(-10 * red))
            rows.append([p, 1 - p])
        return np.asarray(rows, np.float32)

    def class_for_prompt(self, prompt):
        from .classify import match_class

        return match_class(prompt, self.classes)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries almost no data.

    Pillow reads the size from the header and fails only when decoding; so a message about the
    size (not about a truncated file) proves the size was checked before any pixel was decoded.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")

