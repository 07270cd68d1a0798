"""The UNet stage: the UNet and text encoder trained jointly on the latents (epsilon prediction, SD's
noise schedule, EMA), resumable from ``work/unet_checkpoint.pt``; the trained model is exported as a
diffusers pipeline.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from ...sites import SD_SCHEDULER_CONFIG
from ..model import assemble_pipeline, build_text_encoder, build_tokenizer, build_unet
from .data import add_timing
from .plan import TrainPlan


def load_text_encoder_by_word(text: torch.nn.Module, tokenizer, init: Path) -> None:
    """Load the text encoder of the model directory ``init`` into ``text``, whose tokenizer may have
    another vocabulary: each token's embedding row is taken from the token of the same spelling in
    ``init``'s tokenizer (a word both know keeps what it learned), and tokens ``init`` lacks keep
    their fresh initialisation."""
    from transformers import CLIPTextModel, CLIPTokenizer

    state = CLIPTextModel.from_pretrained(Path(init) / "text_encoder").state_dict()
    old_vocab = CLIPTokenizer.from_pretrained(Path(init) / "tokenizer").get_vocab()
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    rows = text.state_dict()[key].clone()
    for token, new_id in tokenizer.get_vocab().items():
        if token in old_vocab:
            rows[new_id] = state[key][old_vocab[token]]
    state[key] = rows
    text.load_state_dict(state)


def draw_timesteps(batch: int, total: int, high_noise_share: float, gen: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform over ``[0, total)``, then a ``high_noise_share`` of them redrawn
    from the noisiest 40%. With a share of 0 nothing more is drawn, so older runs resume identically."""
    t = torch.randint(0, total, (batch,), generator=gen)
    if high_noise_share > 0:
        high = torch.rand(batch, generator=gen) < high_noise_share
        t = torch.where(high, torch.randint(int(0.6 * total), total, (batch,), generator=gen), t)
    return t


def object_weighted_mse(pred: torch.Tensor, target: torch.Tensor, cells: torch.Tensor, weight: float) -> torch.Tensor:
    """Mean squared error where each latent cell counts ``1 + weight * cells`` (``cells``: the object's
    share of it, [B, 1, h, w]), normalised by the batch's mean weight so that an error spread evenly
    costs the same at any ``weight``; ``weight`` 0 is plain MSE."""
    err = (pred - target).pow(2)
    if weight == 0:
        return err.mean()
    w = 1 + weight * cells
    return (err * w).mean() / w.expand_as(err).mean()


def sampling_weights(prompts: list[str], words: str, factor: float) -> torch.Tensor | None:
    """Per-image draw weights: ``factor`` for each of ``words`` (comma list) in its prompt; None
    when no word is given (uniform draws, as every leg before oversampling existed)."""
    chosen = {w.strip() for w in words.split(",") if w.strip()}
    if not chosen:
        return None
    vocab = {w for p in prompts for w in p.split()}
    unknown = chosen - vocab
    if unknown:
        raise ValueError(f"oversampled word(s) {sorted(unknown)} occur in no training prompt")
    hits = torch.tensor([sum(w in chosen for w in p.split()) for p in prompts], dtype=torch.float64)
    return factor ** hits


def train_unet(plan: TrainPlan, data: dict, latents: torch.Tensor, flipped: torch.Tensor, work: Path, ae, out: Path,
               init: Path | None = None):
    """Train the UNet and text encoder jointly (epsilon prediction, SD's noise schedule, EMA).

    ``init``: a model directory whose UNet and text encoder a fresh run starts from (a fine-tune;
    the optimiser, EMA and learning-rate schedule start anew); ignored once a checkpoint exists.
    """
    tokenizer = build_tokenizer(plan.arch)
    prompts = [str(p) for p in data["prompt"]]
    ids = tokenizer(prompts, padding="max_length", max_length=plan.arch.max_tokens, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=plan.arch.max_tokens, return_tensors="pt").input_ids
    torch.manual_seed(plan.seed + 5)
    unet = build_unet(plan.arch)
    text = build_text_encoder(plan.arch, len(tokenizer))
    ckpt = work / "unet_checkpoint.pt"
    if init is not None and not ckpt.exists():
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(init) / "unet").state_dict())
        load_text_encoder_by_word(text, tokenizer, Path(init))
    dev = torch.device(plan.device)
    unet.to(dev)
    text.to(dev)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=plan.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    noise_sched = DDPMScheduler(**SD_SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(plan.seed + 6)  # batches are drawn on the CPU on every device
    start, losses, spent = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=dev)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        for e, v in zip(ema, state["ema"]):
            e.copy_(v)
        gen.set_state(state["gen"].cpu())
        start, losses = int(state["step"]), state["losses"].tolist()
        spent = float(state.get("seconds", 0.0))  # training time before this run (older checkpoints: unknown)
    t0 = time.perf_counter()

    def lr_at(step: int) -> float:
        warm = 300
        if step < warm:
            return plan.unet_lr * (step + 1) / warm
        frac = (step - warm) / max(1, plan.unet_steps - warm)
        return plan.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    n = len(latents)
    # The object's share of each latent cell, mirrored for the flipped latents.
    cells = F.adaptive_avg_pool2d(torch.from_numpy(data["mask"]).float()[:, None], latents.shape[-2:])
    cells_flip = cells.flip(-1)
    unet.train()
    text.train()
    bar = tqdm(range(start, plan.unet_steps), desc="unet", initial=start, total=plan.unet_steps)
    weights = sampling_weights(prompts, plan.unet_oversample, plan.unet_oversample_factor)
    pending: list[torch.Tensor] = []  # losses not yet read back (a read waits for the device)
    for step in bar:
        if weights is None:
            idx = torch.randint(0, n, (plan.unet_batch,), generator=gen)
        else:
            idx = torch.multinomial(weights, plan.unet_batch, replacement=True, generator=gen)
        flip = torch.rand(plan.unet_batch, generator=gen) < 0.5
        z0 = torch.where(flip[:, None, None, None], flipped[idx], latents[idx])
        tok = ids[idx]  # prompts say nothing of place, so a mirrored image keeps its prompt
        drop = torch.rand(plan.unet_batch, generator=gen) < plan.uncond_prob
        tok = torch.where(drop[:, None], empty.expand_as(tok), tok)
        noise = torch.randn(z0.shape, generator=gen)
        t = draw_timesteps(plan.unet_batch, noise_sched.config.num_train_timesteps, plan.unet_high_noise_share, gen)
        zt = noise_sched.add_noise(z0, noise, t)
        obj = torch.where(flip[:, None, None, None], cells_flip[idx], cells[idx])
        zt, t, tok, noise, obj = (v.to(dev, non_blocking=True) for v in (zt, t, tok, noise, obj))
        cond = text(tok)[0]
        loss = object_weighted_mse(unet(zt, t, encoder_hidden_states=cond).sample, noise, obj, plan.unet_object_weight)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(plan.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        pending.append(loss.detach())
        checkpoint = (step + 1) % plan.checkpoint_every == 0 or step + 1 == plan.unet_steps
        if step % 50 == 0 or checkpoint:  # a checkpoint holds every loss so far
            losses += torch.stack(pending).tolist()
            pending.clear()
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
        if checkpoint:
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                        "ema": ema, "gen": gen.get_state(), "step": step + 1,
                        "losses": torch.tensor(losses), "seconds": spent + time.perf_counter() - t0},
                       ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.to("cpu").eval()
    text.to("cpu").eval()
    pipe = assemble_pipeline(unet, ae, text, tokenizer)
    pipe.save_pretrained(out)
    (work / "unet_losses.json").write_text(json.dumps(losses[::10]))
    add_timing(work, "unet_s", spent + time.perf_counter() - t0, replace=True)
    return pipe
