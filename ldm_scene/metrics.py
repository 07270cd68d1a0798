"""Per-image metrics for probe readouts: Dice, IoU, rank and linear correlation, RMSE.

Pure numpy functions: arrays in, a Python float out. The paper (Chen et al. 2023) scores each
test image separately and averages over images, skipping images whose correlation is undefined
(a constant map); :func:`mean_ignore_nan` and the ``mean_*`` helpers do exactly that.

Conventions:
- Masks are compared as booleans; any non-zero value counts as foreground.
- Dice and IoU of two empty masks are 1.0 (both say "no foreground": perfect agreement). This
  matches the paper's ``dice_coeff``, whose ``1e-8`` smoothing term gives 1 in that case.
- Correlations are taken over all pixels of an image (arrays are flattened). A constant input has
  no defined correlation and gives ``nan``, as ``scipy.stats`` does; non-finite inputs are refused
  with ``ValueError`` because a nan would silently poison a rank.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

__all__ = [
    "dice",
    "iou",
    "spearman",
    "pearson",
    "rmse",
    "rank_average",
    "mean_ignore_nan",
    "per_image",
    "mean_dice",
    "mean_iou",
    "mean_spearman",
    "mean_pearson",
    "mean_rmse",
]


def _pair(a: np.ndarray, b: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty input")
    return a, b


def _finite_pair(a: np.ndarray, b: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pair(a, b, name)
    a = a.astype(np.float64, copy=False).ravel()
    b = b.astype(np.float64, copy=False).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{name}: inputs must be finite (got nan or inf)")
    return a, b


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two masks of the same shape; 1.0 if both are empty."""
    pred, target = _pair(pred, target, "dice")
    p, t = pred.astype(bool), target.astype(bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union |A∩B| / |A∪B| of two masks of the same shape; 1.0 if both are empty."""
    pred, target = _pair(pred, target, "iou")
    p, t = pred.astype(bool), target.astype(bool)
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, t).sum()) / union


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened ``x``, ties given the average of the ranks they span (float64)."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_group = np.empty(xs.size, dtype=bool)
    starts_group[:1] = True
    starts_group[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], xs.size)  # exclusive
    # a tie group occupying 0-based positions start..end-1 gets the mean 1-based rank
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = group_rank[group]
    return ranks


def _pearson_flat(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    if na == 0.0 or nb == 0.0:
        return math.nan
    r = float(a @ b) / (na * nb)
    return max(-1.0, min(1.0, r))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over all elements of two same-shaped arrays; ``nan`` if either is constant."""
    a, b = _finite_pair(a, b, "pearson")
    return _pearson_flat(a, b)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over all elements (ties get average ranks); ``nan`` if either is constant.

    This is the Pearson correlation of the two rank vectors, the same definition as
    ``scipy.stats.spearmanr(a, b, axis=None)``.
    """
    a, b = _finite_pair(a, b, "spearman")
    return _pearson_flat(rank_average(a), rank_average(b))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared difference over all elements of two same-shaped arrays."""
    pred, target = _finite_pair(pred, target, "rmse")
    d = pred - target
    return math.sqrt(float(d @ d) / d.size)


def mean_ignore_nan(values: Iterable[float]) -> float:
    """Mean of ``values`` skipping nans (images whose score is undefined); ``nan`` if none is left."""
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def per_image(
    metric: Callable[[np.ndarray, np.ndarray], float], preds: np.ndarray, targets: np.ndarray
) -> np.ndarray:
    """Apply ``metric`` to each image of two batches shaped ``[B, ...]``; returns ``[B]`` float64."""
    preds, targets = np.asarray(preds), np.asarray(targets)
    if preds.shape != targets.shape:
        raise ValueError(f"per_image: shapes differ, {preds.shape} vs {targets.shape}")
    if preds.ndim < 2:
        raise ValueError(f"per_image: expected a batch [B, ...], got shape {preds.shape}")
    return np.array([metric(p, t) for p, t in zip(preds, targets)], dtype=np.float64)


def mean_dice(preds: np.ndarray, targets: np.ndarray) -> float:
    """Dice per image of a ``[B, H, W]`` batch, averaged over images (the paper's foreground score)."""
    return mean_ignore_nan(per_image(dice, preds, targets))


def mean_iou(preds: np.ndarray, targets: np.ndarray) -> float:
    """IoU per image of a ``[B, H, W]`` batch, averaged over images."""
    return mean_ignore_nan(per_image(iou, preds, targets))


def mean_spearman(preds: np.ndarray, targets: np.ndarray) -> float:
    """Spearman per image, averaged over the images where it is defined (the paper's depth score)."""
    return mean_ignore_nan(per_image(spearman, preds, targets))


def spearman_tie_ceiling(targets: np.ndarray, jitter: float = 1e-4, seed: int = 0) -> float:
    """:func:`mean_spearman` of ``targets`` against themselves plus Gaussian noise of std ``jitter``.

    Labels with large tied blocks (a sky of shading 1, a lit ground of one shading) rank every
    tied pixel the same, while a continuous prediction ranks them apart; that costs Spearman even
    when each predicted value is right to within ``jitter``. This is the score of such a nearly
    perfect prediction: the most a predictor that does not reproduce the exact ties can reach.
    """
    targets = np.asarray(targets, dtype=np.float64)
    noise = np.random.default_rng(seed).normal(0.0, jitter, targets.shape)
    return mean_spearman(targets + noise, targets)


def mean_pearson(preds: np.ndarray, targets: np.ndarray) -> float:
    """Pearson per image, averaged over the images where it is defined."""
    return mean_ignore_nan(per_image(pearson, preds, targets))


def mean_rmse(preds: np.ndarray, targets: np.ndarray) -> float:
    """RMSE per image, averaged over images (as the paper reports it, not pooled over pixels)."""
    return mean_ignore_nan(per_image(rmse, preds, targets))
