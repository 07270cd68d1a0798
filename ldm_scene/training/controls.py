"""Controls that could explain a probe's score away: the prompt alone, and the grid's resolution.

A probe reads a site's token grid at one denoising step; its test score means "the model knows
the layout" only beside what it could score without knowing it:

- **prompt-only baseline**: the best label map predictable from the prompt's words alone, the
  per-pixel mean label of the fitting images with the same prompt (the fitting images' mean, i.e.
  the layout prior, for a prompt no fitting image has). It is scored on the test images exactly
  like the probe; its foreground threshold is chosen on the validation images (from the *train*
  images' means, so a validation image never votes for its own map), as the probe's is.
- **same-prompt control**: the probe's prediction for a test image scored against the labels of
  the *other* test images with the same prompt, averaged over them. A probe that read only the
  prompt would score the same against them as against its own image (over a prompt's images the
  two means are equal), so the margin probe - control is what the probe knows beyond the prompt.
- **grid ceiling**: the score of the exact label area-averaged to the site's grid and upsampled
  back the way probe outputs are (:func:`~.evaluate.upsample`), foreground thresholded at 0.5: the
  best any readout on that grid could do. Probe / ceiling tells "capped by resolution" from "the
  model does not know".

Everything here is plain tensors in, scores out; :mod:`.pipeline` streams images through it.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from . import evaluate as ev

__all__ = [
    "shared_prompts",
    "same_prompt_partners",
    "prompt_means",
    "prompt_map",
    "choose_threshold",
    "grid_ceiling_scores",
    "partner_scores",
    "same_prompt_control",
]


def shared_prompts(train: Iterable[str], val: Iterable[str], test: Iterable[str]) -> list[str]:
    """The prompts (sorted) whose per-prompt label means some image will use.

    A test image uses its prompt's mean over the fitting (train + val) images; a validation image,
    when the prompt-only threshold is chosen, its prompt's mean over the train images. Any other
    prompt's map would be the prior anyway, so only these need per-prompt sums; with unique
    prompts (SD's LAION captions) the list is empty and nothing is kept.
    """
    train, val, test = set(train), set(val), set(test)
    return sorted(((train | val) & test) | (train & val))


def same_prompt_partners(prompts: Sequence[str]) -> list[list[int]]:
    """For each position, the other positions with the same prompt (empty for a prompt seen once)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return [[j for j in groups[p] if j != i] for i, p in enumerate(prompts)]


def prompt_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-prompt mean maps ``[P, H, W]`` from label sums ``[P, H, W]`` and image counts ``[P]``.

    A prompt with no images gets nan (use the fallback map for it: :func:`prompt_map`).
    """
    counts = counts.to(sums.dtype).reshape(-1, *([1] * (sums.ndim - 1)))
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))


def prompt_map(prompt: str, index: Mapping[str, int], means: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The prompt-only map ``[H, W]`` for ``prompt`` and whether it came from same-prompt images.

    ``index`` maps prompts to rows of ``means``; an unknown prompt, or a row without images
    (nan), gets ``fallback`` (the mean over all fitting images, the layout prior).
    """
    k = index.get(prompt)
    if k is None or bool(torch.isnan(means[k]).any()):
        return fallback, False
    return means[k], True


def choose_threshold(maps: torch.Tensor, masks: torch.Tensor, grid: Sequence[float]) -> tuple[float, np.ndarray]:
    """The threshold in ``grid`` whose masks ``maps > threshold`` have the best mean Dice with ``masks``.

    ``maps`` and ``masks`` are ``[N, H, W]`` at the labels' resolution (upsample coarse maps first).
    Returns ``(threshold, mean Dice per grid value)``; ties go to the first (lowest) threshold, as
    the probes' calibration does (``argmax``).
    """
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must be the same [N, H, W], got {tuple(maps.shape)}, {tuple(masks.shape)}")
    g = torch.as_tensor(list(grid), dtype=maps.dtype, device=maps.device)
    dice = np.stack([ev.dice_rows(maps[i][None] > g[:, None, None], masks[i] > 0.5) for i in range(maps.shape[0])])
    mean = dice.mean(axis=0)
    return float(grid[int(np.argmax(mean))]), mean


def grid_ceiling_scores(
    task: str,
    target: torch.Tensor,
    grids: Iterable[tuple[int, int]],
    prior: torch.Tensor | None = None,
    target_ranks: Mapping[str, torch.Tensor] | None = None,
) -> dict[tuple[int, int], dict[str, float]]:
    """The grid ceiling of one label map ``target [H, W]`` on each token grid ``(h, w)``.

    The exact label (foreground: the scored mask, ``target > 0.5``) area-averaged to the grid and
    upsampled back bilinearly, scored against the label like a probe's readout: foreground
    thresholded at 0.5 (Dice, IoU), depth Spearman (and residual with ``prior``), shading Spearman.
    """
    source = (target > 0.5).to(torch.float64) if task == "foreground" else target.to(torch.float64)
    out = {}
    for hw in dict.fromkeys(tuple(g) for g in grids):
        pooled = ev.pool(source[None], hw)
        scores = ev.score_maps(task, pooled, target, prior, target_ranks, threshold=0.5)
        out[hw] = {name: float(v[0]) for name, v in scores.items()}
    return out


def partner_scores(
    task: str,
    pred: torch.Tensor,
    partners: torch.Tensor,
    prior: torch.Tensor | None = None,
    partner_ranks: Mapping[str, torch.Tensor] | None = None,
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """One image's readouts ``pred [M, h, w]`` scored against its same-prompt partners' labels
    ``partners [J, H, W]`` and averaged over the partners (nan-skipping): ``{name: [M]}``.

    Scored exactly like the probe against its own image (:func:`~.evaluate.score_maps`); all nan
    when there are no partners.
    """
    if partners.shape[0] == 0:
        if task == "foreground":
            names: tuple[str, ...] = ("score", "iou")
        else:
            names = ("score", "residual") if task == "depth" and prior is not None else ("score",)
        return {name: np.full(pred.shape[0], np.nan) for name in names}
    scores = ev.score_maps(task, pred, partners, prior, partner_ranks, threshold=threshold)
    return {name: ev.nan_mean(v, axis=1) for name, v in scores.items()}


def same_prompt_control(
    task: str,
    preds: torch.Tensor,
    labels: torch.Tensor,
    prompts: Sequence[str],
    prior: torch.Tensor | None = None,
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """The same-prompt control of every image of a test set held in memory.

    ``preds [N, M, h, w]`` are each image's readouts (M of them: e.g. steps), ``labels [N, H, W]``
    the images' labels and ``prompts`` their prompts. Returns ``{name: [N, M]}``: image i's
    readouts scored against the labels of the other images with its prompt, averaged over them
    (nan for an image whose prompt no other image has).
    """
    if len(prompts) != preds.shape[0] or labels.shape[0] != preds.shape[0]:
        raise ValueError(f"need one prompt and one label per image, got {len(prompts)}, {labels.shape[0]} for {preds.shape[0]}")
    rows: dict[str, list[np.ndarray]] = {}
    for i, partners in enumerate(same_prompt_partners(prompts)):
        scores = partner_scores(task, preds[i], labels[partners], prior, None, threshold)
        for name, v in scores.items():
            rows.setdefault(name, []).append(v)
    return {name: np.stack(v) for name, v in rows.items()}
