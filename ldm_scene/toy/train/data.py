"""What every training stage shares: the rendered data set (cached, rendered in parallel), images as
tensors, the learning-rate warm-up, PSNR, and the per-stage timings in ``work/timings.json``.
"""
from __future__ import annotations

import json
import math
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..nets import to_tensor
from ..render import render_batch


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


def image_batch(data: dict, idx: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (diffusers' image range)."""
    return to_tensor(data["image"][idx]) * 2 - 1


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup_frac: float = 0.05):
    """A learning-rate schedule: linear warm-up over ``warmup_frac`` of ``total`` steps, then cosine down to 5%."""
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


def add_timing(work: Path, key: str, seconds: float, replace: bool = False) -> None:
    """Add ``seconds`` of real work to ``key`` in ``work/timings.json`` right away, so an
    interrupted run keeps what its finished stages cost (a stage loaded from cache adds nothing)."""
    path = work / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[key] = seconds if replace else timings.get(key, 0.0) + seconds
    path.write_text(json.dumps(timings, indent=2))
