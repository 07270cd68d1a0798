"""Train the toy world from nothing: renders -> autoencoder -> labelers and classifier -> UNet.

Every stage writes its result and is skipped when that result exists, and the UNet stage keeps a
checkpoint, so an interrupted run resumes where it stopped. All randomness comes from fixed seeds
through explicit generators. The exported model is a diffusers ``StableDiffusionPipeline``
directory; the labelers and classifier sit beside it in ``labelers/``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from diffusers import AutoencoderTiny, DDPMScheduler
from tqdm import tqdm

from .. import bundle
from ..seeds import HELDOUT_SEED0
from ..sites import SD_SCHEDULER_CONFIG
from .model import ToyArch, assemble_pipeline, build_autoencoder, build_text_encoder, build_tokenizer, build_unet
from .nets import ClassifierConfig, LabelerConfig, LabelerNet, ShapeNet, save_net, to_tensor
from .render import FAR, render_batch


@dataclass(frozen=True)
class TrainPlan:
    """How much of everything to train; the defaults fit in well under 2 hours on 2 CPU cores."""

    arch: ToyArch = field(default_factory=ToyArch)
    n_train: int = 10_000
    n_heldout: int = 1_000
    ae_steps: int = 700
    ae_batch: int = 16
    decoder_steps: int = 600
    decoder_batch: int = 32
    decoder_lr: float = 5e-4
    decoder_object_weight: float = 10.0
    # 0 (or the decoder's own width): the decoder stage trains the autoencoder's decoder on. Another
    # N: it trains a fresh decoder N channels wide behind the same frozen encoder (the latents,
    # hence the UNet, stay valid); a wider decoder has more room for the ground's detail, where
    # most of the reconstruction error is.
    decoder_width: int = 0
    labeler_steps: int = 500
    classifier_steps: int = 450
    aux_batch: int = 32
    unet_steps: int = 2_000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    uncond_prob: float = 0.1
    # Share of each UNet batch whose timestep is drawn from the noisiest 40% (t >= 600), where the
    # layout (and so the position word) is decided; 0 draws every timestep uniformly, as SD did.
    unet_high_noise_share: float = 0.0
    # Extra weight of the object's latent cells in the UNet loss (0: plain MSE, as SD). The object
    # covers a few percent of the latent, so orange-vs-red and cylinder-vs-cube cost little in a
    # uniform loss; each cell counts ``1 + unet_object_weight * (its object fraction)``. A 1000-step
    # leg at 10 did not help: orange, drawn as red, went from 26% to 16% right (README, toy model).
    unet_object_weight: float = 0.0
    # Prompt words whose training images are drawn ``unet_oversample_factor`` times as often (comma
    # list, e.g. "cylinder,orange"; an image with two such words counts factor**2). The words the
    # model confuses most (cylinder drawn as cube, orange as red) then get more of the gradient.
    unet_oversample: str = ""
    unet_oversample_factor: float = 2.0
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    seed: int = 0
    # One thread: on a shared 2-core machine, two OpenMP threads stall whenever one core is busy.
    threads: int = 1
    unet_threads: int = 2  # the UNet stage alone, once nothing else runs beside it
    render_processes: int = 2
    # Where the decoder and UNet stages train and the latents are encoded: "cpu", or "cuda" where a
    # GPU is lent. The weights they ship are float32 on CPU either way.
    device: str = "cpu"

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_heldout, self.ae_steps, self.unet_steps) < 1:
            raise ValueError("sizes and step counts must be positive")
        if not 0 <= self.uncond_prob < 1:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob}")
        if not 0 <= self.unet_high_noise_share <= 1:
            raise ValueError(f"unet_high_noise_share must be in [0, 1], got {self.unet_high_noise_share}")
        if self.unet_object_weight < 0:
            raise ValueError(f"unet_object_weight must be >= 0, got {self.unet_object_weight}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.decoder_batch < 1 or self.decoder_width < 0:
            raise ValueError(f"decoder_batch must be >= 1 and decoder_width >= 0, got {self.decoder_batch}, {self.decoder_width}")
        if self.render_processes < 1:
            raise ValueError(f"render_processes must be >= 1, got {self.render_processes}")
        if self.unet_oversample_factor <= 0:
            raise ValueError(f"unet_oversample_factor must be > 0, got {self.unet_oversample_factor}")


def _render_chunk(seeds: list[int]) -> dict:
    d = render_batch(seeds)
    return {
        "image": (d["image"] * 255).round().astype(np.uint8), "mask": d["mask"],
        "depth": d["depth"].astype(np.float16), "shading": d["shading"].astype(np.float16),
        "shape": d["shape"], "colour": d["colour"], "prompt": np.array(d["prompt"]),
    }


def render_dataset(seeds: range, path: Path, processes: int = 2) -> dict[str, np.ndarray]:
    """Render ``seeds`` (cached in ``path``) into uint8 images and exact labels."""
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    chunks = [list(seeds[i : i + 250]) for i in range(0, len(seeds), 250)]
    with get_context("spawn").Pool(processes) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, chunks), total=len(chunks), desc=f"render {path.stem}"))
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def _images(data: dict, idx: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (diffusers' image range)."""
    return to_tensor(data["image"][idx]) * 2 - 1


def _warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup_frac: float = 0.05):
    warm = max(1, int(total * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def train_autoencoder(plan: TrainPlan, data: dict, heldout: dict, out: Path) -> AutoencoderTiny:
    """Train AutoencoderTiny on renders; set ``scaling_factor`` so latents have unit variance."""
    if (out / "config.json").exists():
        return AutoencoderTiny.from_pretrained(out)
    gen = torch.Generator().manual_seed(plan.seed + 1)
    torch.manual_seed(plan.seed + 1)  # module constructors draw from the global RNG
    ae = build_autoencoder(plan.arch)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = _warmup_cosine(opt, plan.ae_steps)
    n = len(data["image"])
    for step in tqdm(range(plan.ae_steps), desc="autoencoder"):
        idx = torch.randint(0, n, (plan.ae_batch,), generator=gen).numpy()
        x = _images(data, idx)
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
        z = torch.cat([ae.encode(_images(data, chunk)).latents for chunk in np.array_split(idx, 8)])
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
    sched = _warmup_cosine(opt, plan.decoder_steps)
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
            x = _images(data, np.arange(i, min(i + 500, len(data["image"])))).to(device)
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
    x = _images(data, idx)
    return ((ae.decode(ae.encode(x).latents).sample + 1) / 2).clamp(0, 1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Generated images are a little noisier and blurrier than renders: make the labelers robust.
    noise = torch.randn(x.shape, generator=gen) * torch.rand(len(x), 1, 1, 1, generator=gen) * 0.04
    return (x + noise).clamp(0, 1)


def train_labelers(plan: TrainPlan, data: dict, ae: AutoencoderTiny, out: Path, init: Path | None = None) -> None:
    """Train the labeler (mask, depth, shading) and the shape classifier on renders and AE reconstructions.

    ``init``: a ``labelers/`` directory whose nets each fit starts from (a fine-tune on new renders).
    """
    gen = torch.Generator().manual_seed(plan.seed + 2)
    n = len(data["image"])
    mask = torch.from_numpy(data["mask"]).float()
    depth = torch.from_numpy(data["depth"].astype(np.float32)) / FAR
    shading = torch.from_numpy(data["shading"].astype(np.float32))
    shapes = torch.from_numpy(data["shape"])

    def batch() -> tuple[torch.Tensor, np.ndarray]:
        idx = torch.randint(0, n, (plan.aux_batch,), generator=gen).numpy()
        half = plan.aux_batch // 2
        # Half the batch as rendered, half through the autoencoder, as generated images are.
        x = torch.cat([to_tensor(data["image"][idx[:half]]), reconstructions(ae, data, idx[half:])])
        return _augment(x, gen), idx

    def fit(net: torch.nn.Module, name: str, steps: int, lr: float, loss_of) -> None:
        if init is not None and (Path(init) / f"{name}.safetensors").exists():
            net.load_state_dict(load_file(str(Path(init) / f"{name}.safetensors")))
            lr = lr / 4  # a fine-tune: start from what the nets know
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        sched = _warmup_cosine(opt, steps)
        for _ in tqdm(range(steps), desc=name):
            x, idx = batch()
            loss = loss_of(net(x), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        save_net(net.eval(), out, name)

    if not (out / bundle.LABELER_FILE).exists():
        torch.manual_seed(plan.seed + 3)
        fit(LabelerNet(LabelerConfig()), "labeler", plan.labeler_steps, 2e-3, lambda y, idx: (
            F.binary_cross_entropy_with_logits(y[:, 0], mask[idx])
            + 10 * F.smooth_l1_loss(y[:, 1], depth[idx], beta=0.05)
            + 10 * F.smooth_l1_loss(y[:, 2], shading[idx], beta=0.05)
        ))
    if not (out / bundle.CLASSIFIER_FILE).exists():
        torch.manual_seed(plan.seed + 4)
        fit(ShapeNet(ClassifierConfig()), "classifier", plan.classifier_steps, 1e-3,
            lambda logits, idx: F.cross_entropy(logits, shapes[idx]))


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
    _add_timing(work, "unet_s", spent + time.perf_counter() - t0, replace=True)
    return pipe


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
        _add_timing(work, "render_s", time.perf_counter() - t0)
    if {"autoencoder", "decoder", "labelers", "unet"} & set(stages):
        t0 = time.perf_counter()
        cached = (work / "vae" / "config.json").exists()
        ae = train_autoencoder(plan, data, heldout, work / "vae").eval()
        if not cached:
            _add_timing(work, "autoencoder_s", time.perf_counter() - t0)
        cached = (work / "vae_tuned" / "config.json").exists()
        if "decoder" in stages or cached:  # later stages use the tuned decoder once it exists
            t0 = time.perf_counter()
            ae = finetune_decoder(plan, data, ae, work).eval()
            if not cached:
                _add_timing(work, "decoder_s", time.perf_counter() - t0)
    if "labelers" in stages:
        t0 = time.perf_counter()
        cached = all((bundle.labelers_dir(out) / name).exists() for name in (bundle.LABELER_FILE, bundle.CLASSIFIER_FILE))
        train_labelers(plan, data, ae, bundle.labelers_dir(out), init=labelers_init)
        if not cached:
            _add_timing(work, "labelers_s", time.perf_counter() - t0)
    if "unet" in stages and not (out / "model_index.json").exists():
        torch.set_num_threads(plan.unet_threads)
        latents = encode_latents(ae, data, work / "latents.pt", device=plan.device)
        flipped = encode_latents(ae, data, work / "latents_flipped.pt", flip=True, device=plan.device)
        train_unet(plan, data, latents, flipped, work, ae, out, init=unet_init)  # records its own time (resumable)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_plan.json").write_text(json.dumps(asdict(plan), indent=2))
    path = work / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _add_timing(work: Path, key: str, seconds: float, replace: bool = False) -> None:
    """Add ``seconds`` of real work to ``key`` in ``work/timings.json`` right away, so an
    interrupted run keeps what its finished stages cost (a stage loaded from cache adds nothing)."""
    path = work / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[key] = seconds if replace else timings.get(key, 0.0) + seconds
    path.write_text(json.dumps(timings, indent=2))
