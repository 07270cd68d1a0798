"""Every way a coarse map (a probe's readout on its site's token grid) reaches image resolution.

:func:`nearest` (tensors) and :func:`nearest_array` (numpy, for maps already fetched) are the
paper's read-out, each token's value filling its cell: the app and
:meth:`~ldm_scene.probes.ProbeBank.readout` show it. :func:`bilinear` is how the probe evaluation
reads maps out before thresholding or ranking (:func:`ldm_scene.training.evaluate.upsample`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["nearest", "nearest_array", "bilinear"]


def nearest(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-upsample ``[B, K, h, w]`` to ``[B, K, *size]`` (each token's value fills its cell)."""
    return F.interpolate(maps, size=tuple(int(s) for s in size), mode="nearest")


def nearest_array(values: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D map to ``(height, width)``, as the paper upsamples probes."""
    values = np.asarray(values)
    h, w = int(size[0]), int(size[1])
    if values.shape == (h, w):
        return values
    rows = (np.arange(h) * values.shape[0] // h).clip(0, values.shape[0] - 1)
    cols = (np.arange(w) * values.shape[1] // w).clip(0, values.shape[1] - 1)
    return values[rows[:, None], cols[None, :]]


def bilinear(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly upsample float maps ``[M, h, w]`` to ``[M, *size]`` (``align_corners=False``)."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
