"""Train the toy world from nothing: renders -> autoencoder -> labelers and classifier -> UNet.

Every stage writes its result and is skipped when that result exists, and the UNet stage keeps a
checkpoint, so an interrupted run resumes where it stopped. All randomness comes from fixed seeds
through explicit generators. The exported model is a diffusers ``StableDiffusionPipeline``
directory; the labelers and classifier sit beside it in ``labelers/``.

Stages, one module each: :mod:`.plan` (:class:`TrainPlan`, how much of everything), :mod:`.data` (the
renders and what every stage shares), :mod:`.autoencoder` (autoencoder, decoder fine-tune, latents),
:mod:`.labelers` (labeler and shape classifier), :mod:`.unet` (UNet and text encoder) and
:mod:`.pipeline` (:func:`train_all`, which strings them together). Command line:
``python -m ldm_scene.toy train`` (:mod:`ldm_scene.toy.command`).
"""
from __future__ import annotations

from ...seeds import HELDOUT_SEED0  # noqa: F401  (re-exported: the held-out renders' first seed)
from .autoencoder import encode_latents, finetune_decoder, reconstructions, train_autoencoder, with_fresh_decoder
from .data import _render_chunk, add_timing, image_batch, psnr, render_dataset, warmup_cosine
from .labelers import train_labelers
from .pipeline import STAGES, train_all
from .plan import TrainPlan
from .unet import draw_timesteps, load_text_encoder_by_word, object_weighted_mse, sampling_weights, train_unet

__all__ = [
    "TrainPlan", "STAGES", "train_all", "render_dataset", "psnr", "add_timing", "image_batch", "warmup_cosine",
    "train_autoencoder", "with_fresh_decoder", "finetune_decoder", "encode_latents", "reconstructions",
    "train_labelers", "load_text_encoder_by_word", "draw_timesteps", "object_weighted_mse", "sampling_weights",
    "train_unet", "_render_chunk", "HELDOUT_SEED0",
]
