"""The autoencoder stages: train AutoencoderTiny on renders, fine-tune (or widen) its decoder behind the
frozen encoder, and encode the latents the UNet trains on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from tqdm import tqdm

from ..model import build_autoencoder
from .data import image_batch, warmup_cosine
from .plan import TrainPlan


def train_autoencoder(plan: TrainPlan, data: dict, heldout: dict, out: Path) -> AutoencoderTiny:
    """Train AutoencoderTiny on renders; set ``scaling_factor`` so latents have unit variance."""
    if (out / "config.json").exists():
        return AutoencoderTiny.from_pretrained(out)
    gen = torch.Generator().manual_seed(plan.seed + 1)
    torch.manual_seed(plan.seed + 1)  # module constructors draw from the global RNG
    ae = build_autoencoder(plan.arch)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, plan.ae_steps)
    n = len(data["image"])
    for step in tqdm(range(plan.ae_steps), desc="autoencoder"):
        idx = torch.randint(0, n, (plan.ae_batch,), generator=gen).numpy()
        x = image_batch(data, idx)
        z = ae.encode(x).latents
        rec = ae.decode(z).sample
        # A small pull of the latents towards 0 keeps them centred and inside the decoder's
        # tanh range, as the pipeline decodes latents / scaling_factor without a shift.
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-3 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    ae.eval()
    with torch.no_grad():
        idx = np.arange(min(2000, len(data["image"])))
        z = torch.cat([ae.encode(image_batch(data, chunk)).latents for chunk in np.array_split(idx, 8)])
    ae.register_to_config(scaling_factor=float(1.0 / z.std()))
    ae.save_pretrained(out)
    return ae


def with_fresh_decoder(ae: AutoencoderTiny, width: int, seed: int) -> AutoencoderTiny:
    """A copy of ``ae`` with its encoder (and so its latents) kept and a new, randomly initialised
    decoder ``width`` channels wide."""
    torch.manual_seed(seed)  # module constructors draw from the global RNG
    # Private keys dropped: "_use_default_values" would reset a scaling_factor set after training.
    # "block_out_channels" (not an argument, kept in the config) is what the pipeline counts for its
    # vae_scale_factor, 2 ** (3 - 1) = 4, so it stays.
    config = {k: v for k, v in ae.config.items() if not k.startswith("_")}
    wide = AutoencoderTiny.from_config({**config, "decoder_block_out_channels": [width] * 3})
    wide.encoder.load_state_dict(ae.encoder.state_dict())
    return wide


def _check_decoder_width(found: int, expected: int, where: Path) -> None:
    """Refuse a cached decoder (or checkpoint) ``found`` channels wide where ``expected`` (0: any) is wanted."""
    if expected and found != expected:
        raise ValueError(f"{where} holds a decoder {found} channels wide, but this plan trains one {expected} wide;"
                         f" remove {where.name} (or pass --decoder-width {found}) to go on")


def finetune_decoder(plan: TrainPlan, data: dict, ae: AutoencoderTiny, work: Path) -> AutoencoderTiny:
    """Train the decoder on (or a fresh one, ``plan.decoder_width``), with the encoder frozen,
    weighting the object's pixels up.

    Latents stay exactly as they were (the UNet is trained on them), so this can run before or
    after the UNet. The object covers a few percent of the image, so a plain reconstruction loss
    spends itself on sky and ground and the decoder draws objects in the wrong hue (red came out
    orange, purple blue); each object pixel counts ``1 + decoder_object_weight`` times. Resumable
    from ``work/decoder_checkpoint.pt``; the result goes to ``work/vae_tuned``.
    """
    out = work / "vae_tuned"
    if (out / "config.json").exists():
        tuned = AutoencoderTiny.from_pretrained(out)
        _check_decoder_width(tuned.config.decoder_block_out_channels[0], plan.decoder_width, out)
        return tuned
    latents = encode_latents(ae, data, work / "latents.pt", device=plan.device) / ae.config.scaling_factor
    if plan.decoder_width and plan.decoder_width != ae.config.decoder_block_out_channels[0]:
        ae = with_fresh_decoder(ae, plan.decoder_width, plan.seed + 8)
    width = ae.config.decoder_block_out_channels[0]
    dev = torch.device(plan.device)
    # The renders stay uint8 and live where the decoder trains (40,000 of them are 0.5 GB).
    images, mask, latents = torch.from_numpy(data["image"]).to(dev), torch.from_numpy(data["mask"]).to(dev), latents.to(dev)
    ae.decoder.to(dev)
    opt = torch.optim.AdamW(ae.decoder.parameters(), lr=plan.decoder_lr, weight_decay=0.0)
    sched = warmup_cosine(opt, plan.decoder_steps)
    gen = torch.Generator().manual_seed(plan.seed + 7)
    start, ckpt = 0, work / "decoder_checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=dev)
        _check_decoder_width(int(state.get("width", width)), width, ckpt)
        ae.decoder.load_state_dict(state["decoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"].cpu())
        start = int(state["step"])
    ae.decoder.train()
    for step in tqdm(range(start, plan.decoder_steps), desc="decoder", initial=start, total=plan.decoder_steps):
        idx = torch.randint(0, len(latents), (plan.decoder_batch,), generator=gen).to(dev)
        x = images[idx].permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
        weight = 1 + plan.decoder_object_weight * mask[idx].float()[:, None]
        err = ae.decoder(latents[idx]) - x
        loss = (err.pow(2) * weight).mean() + 0.5 * (err.abs() * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % plan.checkpoint_every == 0 or step + 1 == plan.decoder_steps:
            torch.save({"decoder": ae.decoder.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "step": step + 1, "width": width}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    ae.to("cpu").eval()
    ae.save_pretrained(out)
    return ae


@torch.no_grad()
def encode_latents(ae: AutoencoderTiny, data: dict, path: Path, flip: bool = False, device: str = "cpu") -> torch.Tensor:
    """Scaled latents of every image (optionally mirrored), cached in ``path``; a CPU tensor."""
    if path.exists():
        return torch.load(path, weights_only=True, map_location="cpu")
    zs = []
    ae.to(device)
    try:
        for i in tqdm(range(0, len(data["image"]), 500), desc=f"encode {path.stem}"):
            x = image_batch(data, np.arange(i, min(i + 500, len(data["image"])))).to(device)
            if flip:
                x = x.flip(-1)
            zs.append((ae.encode(x).latents * ae.config.scaling_factor).cpu())
    finally:
        ae.to("cpu")
    z = torch.cat(zs)
    torch.save(z, path)
    return z


@torch.no_grad()
def reconstructions(ae: AutoencoderTiny, data: dict, idx: np.ndarray) -> torch.Tensor:
    x = image_batch(data, idx)
    return ((ae.decode(ae.encode(x).latents).sample + 1) / 2).clamp(0, 1)
