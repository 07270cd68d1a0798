"""The stages strung together: :func:`train_all` runs renders -> autoencoder -> decoder -> labelers -> UNet,
skipping what exists, and records each stage's time.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ... import bundle
from ...seeds import HELDOUT_SEED0
from .autoencoder import encode_latents, finetune_decoder, train_autoencoder
from .data import add_timing, render_dataset
from .labelers import train_labelers
from .plan import TrainPlan
from .unet import train_unet


STAGES = ("data", "autoencoder", "decoder", "labelers", "unet")


def train_all(out: Path, work: Path, plan: TrainPlan = TrainPlan(), stages: tuple[str, ...] = STAGES,
              unet_init: Path | None = None, labelers_init: Path | None = None) -> dict:
    """Run ``stages`` into ``out`` (shipped files) using ``work`` for caches and checkpoints.

    ``unet_init``: a model directory the UNet stage fine-tunes from (see :func:`train_unet`);
    ``labelers_init``: a ``labelers/`` directory the labelers stage fine-tunes from.

    Stages whose results exist are skipped, so ``labelers`` and ``unet`` (independent once the
    autoencoder exists) can also run as two processes side by side.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
    torch.set_num_threads(plan.threads)
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cached = (work / "train.npz").exists() and (work / "heldout.npz").exists()
    data = render_dataset(range(plan.n_train), work / "train.npz", plan.render_processes)
    heldout = render_dataset(range(HELDOUT_SEED0, HELDOUT_SEED0 + plan.n_heldout), work / "heldout.npz",
                             plan.render_processes)
    if not cached:
        add_timing(work, "render_s", time.perf_counter() - t0)
    if {"autoencoder", "decoder", "labelers", "unet"} & set(stages):
        t0 = time.perf_counter()
        cached = (work / "vae" / "config.json").exists()
        ae = train_autoencoder(plan, data, heldout, work / "vae").eval()
        if not cached:
            add_timing(work, "autoencoder_s", time.perf_counter() - t0)
        cached = (work / "vae_tuned" / "config.json").exists()
        if "decoder" in stages or cached:  # later stages use the tuned decoder once it exists
            t0 = time.perf_counter()
            ae = finetune_decoder(plan, data, ae, work).eval()
            if not cached:
                add_timing(work, "decoder_s", time.perf_counter() - t0)
    if "labelers" in stages:
        t0 = time.perf_counter()
        cached = all((bundle.labelers_dir(out) / name).exists() for name in (bundle.LABELER_FILE, bundle.CLASSIFIER_FILE))
        train_labelers(plan, data, ae, bundle.labelers_dir(out), init=labelers_init)
        if not cached:
            add_timing(work, "labelers_s", time.perf_counter() - t0)
    if "unet" in stages and not (out / "model_index.json").exists():
        torch.set_num_threads(plan.unet_threads)
        latents = encode_latents(ae, data, work / "latents.pt", device=plan.device)
        flipped = encode_latents(ae, data, work / "latents_flipped.pt", flip=True, device=plan.device)
        train_unet(plan, data, latents, flipped, work, ae, out, init=unet_init)  # records its own time (resumable)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_plan.json").write_text(json.dumps(asdict(plan), indent=2))
    path = work / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}
