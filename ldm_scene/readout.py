"""Probe readouts during sampling, and how they are drawn.

:class:`ProbeReader` is a sampler :class:`~ldm_scene.sampler.Reader`: at each step it applies, for
each task, that task's probe at the site chosen for the step, and hands back the maps when the
step is done. It keeps nothing but the current step's maps, so a run of any length costs the
memory of one step.

The rest are pure numpy/PIL helpers that turn maps into pictures (foreground as a tinted overlay
on the preview, depth and shading through colour maps with a fixed range, so a map's colours mean
the same at every step) and score per-step maps against a reference (the probe emergence of one
image).
"""
from __future__ import annotations

import math
from typing import Collection, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .metrics import dice, spearman
from .probes import TASKS, ProbeBank, ProbeError

__all__ = [
    "ProbeReader",
    "SiteChoice",
    "site_for_step",
    "upsample_nearest",
    "foreground_overlay",
    "colormap_image",
    "value_range",
    "readout_image",
    "emergence",
]

#: A task's site: one site for every step, or a site per step (``{step: site}``).
SiteChoice = str | Mapping[int, str]

# Matplotlib colour maps by task; depth is reversed so that near is bright, as MiDaS-style
# inverse-depth pictures are usually shown.
_CMAPS = {"depth": "magma_r", "shading": "gray"}
_FOREGROUND_TINT = (255, 40, 40)


def site_for_step(choice: SiteChoice, step: int) -> str | None:
    """The site a task reads at ``step``: the one site, or the step's entry (None if absent)."""
    if isinstance(choice, str):
        return choice
    return choice.get(int(step))


class ProbeReader:
    """Apply each task's probe at its chosen site, step by step (a sampler ``Reader``).

    ``banks`` maps task -> :class:`ProbeBank` (already on the model's device for speed; any device
    works). ``sites`` maps task -> a site key, or ``{step: site}`` for a per-step choice (e.g. the
    best site at each step). Tasks in ``sites`` without a bank are refused; a step the chosen
    site's probe does not cover is simply not reported. ``out_size`` is the ``(height, width)`` of
    the returned maps; ``None`` keeps each site's own token grid (smallest; upsample for display
    with :func:`upsample_nearest`).
    """

    name = "probes"

    def __init__(
        self,
        banks: Mapping[str, ProbeBank],
        sites: Mapping[str, SiteChoice],
        out_size: int | Sequence[int] | None = None,
    ) -> None:
        missing = [t for t in sites if t not in banks]
        if missing:
            raise ProbeError(f"no probe bank for task(s) {missing}; loaded: {sorted(banks) or 'none'}")
        for task, choice in sites.items():
            chosen = {choice} if isinstance(choice, str) else set(choice.values())
            unknown = sorted(chosen - set(banks[task].sites))
            if unknown:
                raise ProbeError(
                    f"{task}: no probes at site(s) {unknown}; this bank has {', '.join(banks[task].sites)}"
                )
        self.banks = dict(banks)
        self.choices = dict(sites)
        self.out_size = out_size
        used = set()
        for choice in self.choices.values():
            used |= {choice} if isinstance(choice, str) else set(choice.values())
        bank_order = [s for bank in self.banks.values() for s in bank.sites]
        self.sites: tuple[str, ...] = tuple(dict.fromkeys(s for s in bank_order if s in used))
        covered: set[int] = set()
        for task, choice in self.choices.items():
            steps = self.banks[task].steps
            covered |= set(steps) if isinstance(choice, str) else {s for s in choice if s in steps}
        self.steps: Collection[int] | None = frozenset(covered)
        self._pending: dict[str, np.ndarray] = {}

    def read(self, site: str, step: int, activation: torch.Tensor) -> None:
        for task, choice in self.choices.items():
            if site_for_step(choice, step) != site or (site, step) not in self.banks[task]:
                continue
            bank = self.banks[task]
            size = self.out_size if self.out_size is not None else bank.meta.sites[site][1:]
            self._pending[task] = bank.readout(site, step, activation[:1], size)[0]

    def collect(self, step: int) -> dict[str, np.ndarray]:
        """This step's maps ``{task: float32 [H, W]}`` (only tasks that had a probe here)."""
        out, self._pending = self._pending, {}
        return out


# --- pictures ------------------------------------------------------------------------------------


def upsample_nearest(values: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D map to ``(height, width)``, as the paper upsamples probes."""
    values = np.asarray(values)
    h, w = int(size[0]), int(size[1])
    if values.shape == (h, w):
        return values
    rows = (np.arange(h) * values.shape[0] // h).clip(0, values.shape[0] - 1)
    cols = (np.arange(w) * values.shape[1] // w).clip(0, values.shape[1] - 1)
    return values[rows[:, None], cols[None, :]]


def _display(image: Image.Image, size: int | None) -> Image.Image:
    image = image.convert("RGB")
    if size is None or image.size == (size, size):
        return image
    # Small toy images are blown up without smoothing so every pixel stays visible.
    resample = Image.NEAREST if max(image.size) * 2 <= size else Image.BILINEAR
    return image.resize((size, size), resample)


def foreground_overlay(
    image: Image.Image, prob: np.ndarray, display_size: int | None = None, alpha: float = 0.6
) -> Image.Image:
    """The image with the foreground probability ``prob`` (any grid) laid over it as a red tint."""
    base = _display(image, display_size)
    w, h = base.size
    p = np.clip(upsample_nearest(np.asarray(prob, np.float32), (h, w)), 0.0, 1.0)[..., None]
    rgb = np.asarray(base, np.float32)
    tint = np.array(_FOREGROUND_TINT, np.float32)
    out = rgb * (1 - alpha * p) + tint * (alpha * p)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def value_range(bank: ProbeBank) -> tuple[float, float]:
    """A fixed colour range for a depth/shading bank: its target mean +- 2 standard deviations."""
    lo = bank.meta.target_mean - 2 * bank.meta.target_std
    hi = bank.meta.target_mean + 2 * bank.meta.target_std
    return float(lo), float(hi)


def colormap_image(
    values: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis", display_size: int | None = None
) -> Image.Image:
    """A 2-D map through a matplotlib colour map, ``[vmin, vmax]`` fixed, nearest-upsampled."""
    import matplotlib

    values = np.asarray(values, np.float32)
    if display_size is not None:
        values = upsample_nearest(values, (display_size, display_size))
    span = vmax - vmin if math.isfinite(vmax - vmin) and vmax > vmin else 1.0
    scaled = np.nan_to_num((values - vmin) / span, nan=0.0).clip(0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](scaled, bytes=True)
    return Image.fromarray(rgba[..., :3])


def readout_image(
    task: str,
    values: np.ndarray,
    preview: Image.Image,
    bank: ProbeBank,
    display_size: int | None = None,
) -> Image.Image:
    """The picture of one task's map: overlay for foreground, colour map for depth and shading."""
    if task not in TASKS:
        raise ProbeError(f"unknown task {task!r}")
    if task == "foreground":
        return foreground_overlay(preview, values, display_size)
    lo, hi = value_range(bank)
    size = display_size or max(preview.size)
    return colormap_image(values, lo, hi, _CMAPS[task], size)


# --- emergence for one image -----------------------------------------------------------------------


def emergence(
    per_step: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
) -> dict[str, list[float]]:
    """Score each step's maps against a reference: Dice for foreground, Spearman for depth/shading.

    ``per_step[s]`` holds the step's maps (any grid, upsampled to the reference's size);
    ``reference`` the target per task (a bool/probability mask for foreground, values otherwise).
    A step without a map for a task, or an undefined correlation (a constant map), scores nan.
    Returns ``{task: [score per step]}`` for the tasks in ``reference``.
    """
    curves: dict[str, list[float]] = {}
    for task, ref in reference.items():
        ref = np.asarray(ref)
        scores = []
        for maps in per_step:
            if task not in maps:
                scores.append(float("nan"))
                continue
            pred = upsample_nearest(np.asarray(maps[task]), ref.shape)
            if task == "foreground":
                scores.append(dice(pred > 0.5, ref > 0.5))
            else:
                scores.append(spearman(pred, ref) if np.isfinite(pred).all() else float("nan"))
        curves[task] = scores
    return curves
