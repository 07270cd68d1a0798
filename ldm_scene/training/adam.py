"""The paper's Adam trainer, and the Adam vs ridge comparison of a probe run."""
from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..probes import TASKS, ProbeBank, ProbeError, probe_path, task_outputs, tensor_name
from .config import UNET, _META_KEY
from .context import RunContext
from .fit import RidgeStats, ridge_targets, to_normalised
from .solve import Solution


def train_adam(
    acts: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, None]:
    """Train a bias-free linear probe the paper's way; returns ``(w [K, C] float32 CPU, None)``.

    ``acts`` is ``[N, T, C]`` (N images, T tokens; any float dtype, converted per batch) and
    ``targets`` ``[N, T]`` at token resolution: for foreground, integer classes 0/1 or floats in
    [0, 1] (the fraction of each token's cell that is foreground, used as soft cross-entropy
    targets, which equals the paper's loss on its nearest-upsampled map); for depth/shading, the
    (normalised) values, fit with ``HuberLoss`` (delta 1) as in the paper. Images are shuffled
    each epoch by a ``torch.Generator`` seeded with ``seed``, which also draws the initial weight
    (``nn.Linear``'s default uniform bound ``1/sqrt(C)``); nothing is seeded globally.
    """
    if task not in TASKS:
        raise ProbeError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if acts.ndim != 3 or targets.shape != acts.shape[:2]:
        raise ValueError(f"acts must be [N, T, C] and targets [N, T], got {tuple(acts.shape)}, {tuple(targets.shape)}")
    n, _, c = acts.shape
    k = task_outputs(task)
    device = torch.device(device) if device is not None else acts.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1.0 / math.sqrt(c)
    weight = ((torch.rand(k, c, generator=gen, dtype=torch.float32) * 2 - 1) * bound).to(device)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    soft = task == "foreground" and targets.is_floating_point()

    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc=f"adam {task}", leave=False)
    with torch.enable_grad():
        for _ in epoch_iter:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                x = acts[idx.to(acts.device)].to(device=device, dtype=torch.float32)
                t = targets[idx.to(targets.device)].to(device)
                out = x @ weight.T  # [b, T, K]
                if task == "foreground":
                    logits = out.reshape(-1, k)
                    if soft:
                        p = t.reshape(-1).to(torch.float32)
                        loss = F.cross_entropy(logits, torch.stack([1 - p, p], dim=1))
                    else:
                        loss = F.cross_entropy(logits, t.reshape(-1).long())
                else:
                    loss = F.huber_loss(out[..., 0], t.to(torch.float32))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return weight.detach().to(torch.float32).cpu(), None


# --- the paper's Adam trainer, for comparison -----------------------------------------------

def train_adam_probes(ctx: RunContext, sol: Solution, progress: bool = True) -> dict[str, Any]:
    """Fit Adam probes (the paper's trainer) and ridge probes on the same kept activations.

    Uses the first ``adam_images`` fitting images' activations at ``adam_keys`` (saved during the
    fit pass). Ridge uses the penalty chosen for that (task, site, step) in the main fit. Saves
    ``work/adam.safetensors`` (both kinds of weights) and returns timing and sizes.
    """
    c = ctx.config
    keys = ctx.adam_keys
    indices = sorted(ctx.adam_indices)
    if not keys or not indices:
        return {}
    files = [load_file(str(ctx.work / "adam" / f"{i:06d}.safetensors")) for i in indices]
    out: dict[str, torch.Tensor] = {}
    seconds = {"adam": 0.0, "ridge": 0.0}
    for site, step in tqdm(keys, desc="adam vs ridge", disable=not progress):
        acts = torch.stack([f[f"{site}.step{step:02d}.act"] for f in files])  # [N, T, C] fp16
        for task in ctx.layout.tasks:
            y = torch.stack([f[f"{site}.{task}"] for f in files]).to(torch.float64)  # [N, T] raw
            mean, std = sol.norm[task]
            y_norm = y if task == "foreground" else (y - mean) / std
            t0 = time.perf_counter()
            stats = RidgeStats(acts.shape[2], task_outputs(task))
            for a, t in zip(acts, y):
                stats.update(a.to(torch.float64), ridge_targets(task, t))
            penalty = sol_penalty(ctx, sol, task, site, step)
            w, b = stats.solve(penalty)
            if task != "foreground":
                w, b = to_normalised(w, b, mean, std)
            seconds["ridge"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            wa, _ = train_adam(acts, y_norm.to(torch.float32), task, epochs=c.adam_epochs, seed=c.seed)
            seconds["adam"] += time.perf_counter() - t0
            stem = f"{task}/{site}/{step:03d}"
            out[f"ridge/{stem}/weight"], out[f"ridge/{stem}/bias"] = w.contiguous(), b.contiguous()
            out[f"adam/{stem}/weight"] = wa.contiguous()
            out[f"adam/{stem}/bias"] = torch.zeros(wa.shape[0])
    meta = {"n_images": len(indices), "epochs": c.adam_epochs, "lr": 1e-3, "batch_size": 4, "seconds": seconds}
    save_file(out, str(ctx.work / "adam.safetensors"), metadata={_META_KEY: json.dumps(meta)})
    return meta


def sol_penalty(ctx: RunContext, sol: Solution, task: str, site: str, step: int) -> float:
    """The penalty chosen for ``(task, site, step)`` (from memory, or the saved bank's metadata)."""
    if sol.penalties:
        return sol.penalties[UNET][task][(site, step)]
    bank = ProbeBank.load(probe_path(ctx.out, task))
    return float(bank.meta.training["penalty"][tensor_name(site, step, "weight")[: -len(".weight")]])


def load_adam(ctx: RunContext) -> tuple[dict[str, dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]]], dict]:
    path = ctx.work / "adam.safetensors"
    if not path.exists():
        return {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    tensors = load_file(str(path))
    out: dict = {"adam": {}, "ridge": {}}
    for name, tensor in tensors.items():
        kind, task, site, step, what = name.split("/")
        if what == "weight":
            out[kind][(task, site, int(step))] = (tensor, tensors[f"{kind}/{task}/{site}/{step}/bias"])
    return out, meta
