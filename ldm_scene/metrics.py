"""Per-image metrics for probe readouts: Dice, IoU, rank and linear correlation, RMSE.

Per-image functions take numpy arrays and return a Python float. The paper (Chen et al. 2023) scores each
test image separately and averages over images, skipping images whose correlation is undefined
(a constant map); :func:`mean_ignore_nan` and the ``mean_*`` helpers do exactly that.

Conventions:
- Masks are compared as booleans; any non-zero value counts as foreground.
- Dice and IoU of two empty masks are 1.0 (both say "no foreground": perfect agreement). This
  matches the paper's ``dice_coeff``, whose ``1e-8`` smoothing term gives 1 in that case.
- Correlations are taken over all pixels of an image (arrays are flattened) with ``scipy.stats``
  (ties get average ranks). A constant input has no defined correlation and gives ``nan`` (as
  ``scipy.stats`` does, here without its warning); non-finite inputs are refused with
  ``ValueError`` because a nan would silently poison a rank.
- The ``*_rows`` functions are the same metrics batched over rows of torch tensors (every
  readout of an image against one or several targets at once), for the probe evaluation.
- :func:`bootstrap_mean_ci` resamples test images (a seeded generator) for confidence intervals of
  mean scores and of paired score differences.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import scipy.stats
import torch

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
    "spearman_tie_ceiling",
    "bootstrap_mean_ci",
    "rank_rows",
    "correlation_rows",
    "dice_rows",
    "iou_rows",
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
    return scipy.stats.rankdata(np.asarray(x).ravel(), method="average").astype(np.float64, copy=False)


def _constant(x: np.ndarray) -> bool:
    return x.size < 2 or bool(x.min() == x.max())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over all elements of two same-shaped arrays; ``nan`` if either is constant."""
    a, b = _finite_pair(a, b, "pearson")
    if _constant(a) or _constant(b):
        return math.nan  # scipy would say the same, with a ConstantInputWarning
    return float(np.clip(scipy.stats.pearsonr(a, b).statistic, -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over all elements (ties get average ranks); ``nan`` if either is constant.

    ``scipy.stats.spearmanr(a, b, axis=None)``: the Pearson correlation of the two average-rank vectors.
    """
    a, b = _finite_pair(a, b, "spearman")
    if _constant(a) or _constant(b):
        return math.nan
    return float(np.clip(scipy.stats.spearmanr(a, b).statistic, -1.0, 1.0))


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


def bootstrap_mean_ci(
    values: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile-bootstrap confidence interval of the nan-skipping mean over images.

    ``values`` is ``[N]`` or ``[N, ...]``: one score (or paired difference of scores) per test
    image along axis 0. Images are resampled with replacement ``resamples`` times with
    ``numpy.random.default_rng(seed)``; every column uses the same resampled images, so intervals
    of different columns (steps) are drawn from the same resamples. Returns ``(mean, low, high)``,
    each shaped ``values.shape[1:]``; nan where a column has no finite value.
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError(f"bootstrap_mean_ci: expected [N, ...] with N >= 1, got shape {values.shape}")
    n = values.shape[0]
    flat = values.reshape(n, -1)
    ok = np.isfinite(flat)
    clean = np.where(ok, flat, 0.0)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    # how often each image is drawn in each resample, so a resample's sums are one matmul
    weights = np.zeros((resamples, n))
    np.add.at(weights, (np.arange(resamples)[:, None], idx), 1.0)
    sums = weights @ clean  # [resamples, columns]
    counts = weights @ ok
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        mean = np.where(ok.sum(0) > 0, clean.sum(0) / np.maximum(ok.sum(0), 1), np.nan)
    alpha = (1.0 - level) / 2
    low, high = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    for col in range(flat.shape[1]):
        finite = means[:, col][np.isfinite(means[:, col])]
        if finite.size:
            low[col], high[col] = np.quantile(finite, [alpha, 1.0 - alpha])
    shape = values.shape[1:]
    return mean.reshape(shape), low.reshape(shape), high.reshape(shape)


# --- batched over rows, in torch (the probe evaluation scores every step and site at once) ----

def rank_rows(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..P of each row of ``x [M, P]``, ties given the mean of the ranks they span (float64, on
    ``x``'s device): :func:`rank_average` of every row, by ``scipy.stats.rankdata``."""
    if x.ndim != 2:
        raise ValueError(f"expected [M, P], got {tuple(x.shape)}")
    ranks = scipy.stats.rankdata(x.detach().cpu().numpy(), method="average", axis=1).astype(np.float64, copy=False)
    return torch.from_numpy(ranks).to(x.device)


def correlation_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Pearson correlation of every row of ``a [M, P]`` with every row of ``b [J, P]``: ``[M, J]``.

    Given average ranks (:func:`rank_rows`), this is Spearman's correlation. ``nan`` where a row is
    constant, as :func:`spearman`.
    """
    a = a.to(torch.float64)
    b = b.to(device=a.device, dtype=torch.float64)
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    num = a @ b.T
    den = torch.outer(a.pow(2).sum(-1).sqrt(), b.pow(2).sum(-1).sqrt())
    ok = den > 0
    r = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan))
    return r.clamp(-1, 1).cpu().numpy()


def _row_targets(target: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if target.ndim == 2:
        return target[None], True
    if target.ndim == 3:
        return target, False
    raise ValueError(f"target must be [H, W] or [J, H, W], got {tuple(target.shape)}")


def _mask_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """|A| ``[M, 1]``, |B| ``[1, J]`` and |A n B| ``[M, J]`` of masks ``pred [M, H, W]`` and ``target [(J,) H, W]``."""
    targets, single = _row_targets(target)
    if tuple(pred.shape[-2:]) != tuple(targets.shape[-2:]):
        raise ValueError(f"masks must have the same size, got {tuple(pred.shape[-2:])} and {tuple(targets.shape[-2:])}")
    # float32 counts are exact up to 2**24 pixels (a 4096 x 4096 label)
    a = pred.reshape(pred.shape[0], -1).to(torch.float32)
    b = targets.bool().to(pred.device).reshape(targets.shape[0], -1).to(torch.float32)
    return (a.sum(1, keepdim=True).double(), b.sum(1)[None].double(), (a @ b.T).double(), single)


def dice_rows(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Dice of each mask of ``pred [M, H, W]`` with ``target [H, W]`` (``[M]``; 1.0 if both are empty).

    With ``target [J, H, W]``: every mask against every target, ``[M, J]``. Masks of both
    arguments are at the same (label) resolution: see :func:`foreground_mask`.
    """
    a, b, inter, single = _mask_counts(pred.bool(), target)
    total = a + b
    d = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(inter)).cpu().numpy()
    return d[:, 0] if single else d


def iou_rows(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """IoU of each mask of ``pred [M, H, W]`` with ``target [H, W]`` (or ``[J, H, W]``); 1.0 if both are empty."""
    a, b, inter, single = _mask_counts(pred.bool(), target)
    union = a + b - inter
    j = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)).cpu().numpy()
    return j[:, 0] if single else j
