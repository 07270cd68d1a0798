"""Scoring probe readouts on test images.

Per test image and step, every readout (a probe at a site, the latent probe, the permuted-UNet
probe, the labeler applied to the decoded x0 preview, the layout prior, the prompt-only map, the
site grid's ceiling) is compared with the labeler's labels of the *final* image, at the labels'
resolution (the paper's protocol). A readout on a coarser grid is first brought to the labels'
size by :func:`upsample` (bilinear, ``align_corners=False``: the one read-out of every map in the
training package), then:

- foreground: Dice (and IoU) of the readout above its threshold (a probe's calibrated logit margin
  above 0, i.e. the ridge prediction above the threshold chosen on the validation images; a map
  of foreground fractions above its own threshold) against the labeler's mask (> 0.5);
- depth: Spearman rank correlation over all pixels, raw and *residual* (DESIGN.md section 4: the
  fitting images' per-pixel mean depth map subtracted from prediction and target, so that the
  layout prior alone scores 0);
- shading: Spearman rank correlation.

:func:`score_maps` scores ``M`` readouts against one target ``[H, W]`` (``[M]`` scores) or against
``J`` targets ``[J, H, W]`` at once (``[M, J]``: every readout against every target, which the
same-prompt control needs); a readout's ranks are computed once whatever ``J`` is. Scores are
averaged over test images, skipping images where a correlation is undefined (a constant map), as
:mod:`ldm_scene.metrics` does; the batched metrics (:func:`ldm_scene.metrics.rank_rows`,
:func:`~ldm_scene.metrics.correlation_rows`, :func:`~ldm_scene.metrics.dice_rows`,
:func:`~ldm_scene.metrics.iou_rows`) live there beside the per-image ones and compute exactly them.

Steps are 0-based denoising-loop indices everywhere in ``metrics.json``; the README
(:mod:`.report`) prints them 1-based ("step 5 of 15" is index 4).
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import correlation_rows as rank_correlations
from ..metrics import dice_rows, iou_rows
from ..metrics import rank_rows as average_ranks
from ..upsample import bilinear

__all__ = [
    "METRIC",
    "average_ranks",
    "rank_correlations",
    "spearman_rows",
    "dice_rows",
    "iou_rows",
    "upsample",
    "pool",
    "foreground_mask",
    "target_ranks_for",
    "score_maps",
    "first_step_reaching",
    "nan_mean",
    "json_clean",
    "dumps",
]

#: The headline metric of each task.
METRIC = {"foreground": "dice", "depth": "spearman", "shading": "spearman"}
#: How every coarse map is brought to the labels' resolution (for metrics.json and the README).
UPSAMPLING = "bilinear (align_corners=False), before thresholding"


def _check_finite(*xs: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(x).all()) for x in xs):
        raise ValueError("spearman: inputs must be finite (got nan or inf)")


def upsample(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample maps ``[M, h, w]`` to ``[M, *size]`` (``align_corners=False``).

    The one way a coarse readout (a probe on its site's token grid, a pooled label) reaches the
    labels' resolution in the training package; threshold *after* it (:func:`foreground_mask`).
    A linear probe commutes with it: upsampling the probe's output equals applying the probe to
    bilinearly upsampled activations. Masks (bool) are refused: upsample the scores, then threshold.
    """
    if pred.dtype == torch.bool:
        raise TypeError("upsample takes scores, not masks: upsample first, then threshold")
    if pred.ndim != 3:
        raise ValueError(f"expected maps [M, h, w], got {tuple(pred.shape)}")
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    dtype = pred.dtype if pred.is_floating_point() else torch.float32
    return bilinear(pred.to(dtype), size)


def pool(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-average maps ``[M, H, W]`` to a token grid ``[M, h, w]`` (how probe targets are made)."""
    return F.adaptive_avg_pool2d(maps[:, None].to(torch.float64), tuple(grid))[:, 0]


def foreground_mask(pred: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """``upsample(pred) > threshold`` as a bool mask ``[M, *size]``; a bool ``pred`` must already be at ``size``."""
    if pred.dtype == torch.bool:
        if tuple(pred.shape[-2:]) != tuple(size):
            raise ValueError(f"a mask must be at the labels' size {tuple(size)}, got {tuple(pred.shape[-2:])}")
        return pred
    return upsample(pred, size) > threshold


def _targets(target: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if target.ndim == 2:
        return target[None], True
    if target.ndim == 3:
        return target, False
    raise ValueError(f"target must be [H, W] or [J, H, W], got {tuple(target.shape)}")


def spearman_rows(pred: torch.Tensor, target: torch.Tensor, target_ranks: torch.Tensor | None = None) -> np.ndarray:
    """Spearman correlation of each map of ``pred [M, h, w]``, upsampled, with ``target [H, W]``: ``[M]``.

    With ``target [J, H, W]``, every map against every target: ``[M, J]``. ``target_ranks`` may
    pass the targets' :func:`average_ranks` (``[P]`` or ``[J, P]``) to save a sort. Non-finite
    inputs raise ``ValueError``.
    """
    _check_finite(pred, target)
    targets, single = _targets(target)
    size = tuple(targets.shape[-2:])
    m = pred.shape[0]
    ranks = average_ranks(upsample(pred, size).reshape(m, -1).to(torch.float64))
    if target_ranks is None:
        target_ranks = average_ranks(targets.reshape(targets.shape[0], -1).to(torch.float64))
    r = rank_correlations(ranks, target_ranks.reshape(targets.shape[0], -1))
    return r[:, 0] if single else r


def score_maps(
    task: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    prior: torch.Tensor | None = None,
    target_ranks: Mapping[str, torch.Tensor] | None = None,
    threshold: float = 0.5,
) -> dict[str, np.ndarray]:
    """Scores of readouts ``pred [M, h, w]`` (upsampled bilinearly) against the final image's labels.

    ``target`` is ``[H, W]`` (scores ``[M]``) or ``[J, H, W]`` (scores ``[M, J]``, every readout
    against every target). Foreground: the mask is ``upsample(pred) > threshold`` (or ``pred``
    itself when it is a bool mask at the labels' size) and the result has ``"score"`` (Dice) and
    ``"iou"``. Depth: ``"score"`` (Spearman) and, with the ``prior`` map, ``"residual"``
    (Spearman after subtracting it from both, at full resolution). Shading: ``"score"``.
    ``target_ranks`` may hold the targets' precomputed ranks (:func:`target_ranks_for`).
    """
    target_ranks = target_ranks or {}
    size = tuple(target.shape[-2:])
    if task == "foreground":
        mask = foreground_mask(pred, size, threshold)
        truth = target > 0.5
        return {"score": dice_rows(mask, truth), "iou": iou_rows(mask, truth)}
    _check_finite(pred, target)
    targets, single = _targets(target)
    m, j = pred.shape[0], targets.shape[0]
    full = upsample(pred, size).reshape(m, -1).to(torch.float64)
    flat = targets.reshape(j, -1).to(torch.float64)
    ranks = target_ranks.get("score")
    if ranks is None:
        ranks = average_ranks(flat)
    out = {"score": rank_correlations(average_ranks(full), ranks.reshape(j, -1))}
    if task == "depth" and prior is not None:
        p = prior.reshape(1, -1).to(device=full.device, dtype=torch.float64)
        res_ranks = target_ranks.get("residual")
        if res_ranks is None:
            res_ranks = average_ranks(flat - p)
        out["residual"] = rank_correlations(average_ranks(full - p), res_ranks.reshape(j, -1))
    return {k: v[:, 0] for k, v in out.items()} if single else out


def target_ranks_for(task: str, target: torch.Tensor, prior: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Ranks of a target map ``[H, W]`` (``[P]``) or maps ``[J, H, W]`` (``[J, P]``), and of their
    residuals, for :func:`score_maps`; computed once per image."""
    if task == "foreground":
        return {}
    targets, single = _targets(target)
    flat = targets.reshape(targets.shape[0], -1).to(torch.float64)
    ranks = {"score": average_ranks(flat)}
    if task == "depth" and prior is not None:
        ranks["residual"] = average_ranks(flat - prior.reshape(1, -1).to(device=flat.device, dtype=torch.float64))
    return {k: v[0] for k, v in ranks.items()} if single else ranks


def nan_mean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over ``axis`` ignoring nans (images where a score is undefined); nan where all are."""
    values = np.asarray(values, dtype=np.float64)
    count = np.sum(~np.isnan(values), axis=axis)
    total = np.nansum(values, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def first_step_reaching(curve: Sequence[float | None], fraction: float = 0.9) -> int | None:
    """The first 0-based step whose score reaches ``fraction`` of the last step's score.

    ``None`` when the final score is undefined or not positive (no meaningful fraction of it).
    """
    values = [math.nan if v is None else float(v) for v in curve]
    if not values or not math.isfinite(values[-1]) or values[-1] <= 0:
        return None
    goal = fraction * values[-1]
    for step, v in enumerate(values):
        if math.isfinite(v) and v >= goal:
            return step
    return None


def json_clean(obj: Any) -> Any:
    """Make ``obj`` JSON-safe: numpy scalars and arrays to Python, nan and inf to ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def dumps(metrics: Mapping[str, Any]) -> str:
    """``metrics.json`` text: JSON-cleaned (nan -> null), indented, stable key order as built."""
    return json.dumps(json_clean(metrics), indent=1, allow_nan=False)
