"""Target masks for moving an object: its mask shifted or nudged, or a region drawn anywhere.

Generic (no knowledge of any world): each function takes the object's current mask (bool
[H, W]) and a ``numpy`` generator and returns the target mask with the parameters it drew.
Shifts keep the moved mask's bounding box in the frame, so nothing is clipped; a nudge with no
room in any direction (an object spanning the frame) is clipped: what would leave the frame is
dropped. Drawn regions (ellipse, rectangle, the object's mask scaled) lie in the frame by
construction.
"""
from __future__ import annotations

import math

import numpy as np

from .intervention import translate_mask

#: A nudge moves the object by this fraction of the image width.
NUDGE_FRACTION = 0.10
#: A shift moves it by at least this fraction of the width (Euclidean).
MIN_SHIFT = 0.15
#: Drawn regions cover a fraction of the image drawn uniformly from this range.
DRAWN_AREA = (0.08, 0.30)
#: Scale factors (linear) of the ``scaled`` target.
SCALE_RANGE = (0.7, 1.4)
TARGET_KINDS: tuple[str, ...] = ("shift", "nudge", "ellipse", "rectangle", "scaled")


def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """The mask's centroid (x, y) as fractions of the image width and height (None if empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return float((cols.mean() + 0.5) / mask.shape[1]), float((rows.mean() + 0.5) / mask.shape[0])


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a non-empty mask, inclusive."""
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def shift_room(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(dx_min, dx_max, dy_min, dy_max): the shifts that keep the mask's bounding box in the frame."""
    h, w = mask.shape
    top, bottom, left, right = bounding_box(mask)
    return -left, w - 1 - right, -top, h - 1 - bottom


def shift_target(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The mask moved by a random (dx, dy) of either sign that keeps it whole in the frame.

    (dx, dy) is drawn uniformly over the room on each axis, redrawn until the move is at least
    :data:`MIN_SHIFT` of the width (after 100 draws, the longest draw is taken).
    """
    w = mask.shape[1]
    x0, x1, y0, y1 = shift_room(mask)
    best = (0, 0)
    for _ in range(100):
        dx, dy = int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))
        if math.hypot(dx, dy) > math.hypot(*best):
            best = (dx, dy)
        if math.hypot(dx, dy) >= MIN_SHIFT * w:
            break
    dx, dy = best
    return translate_mask(mask, dx, dy), {"dx": dx, "dy": dy}


def nudge_target(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The mask moved by :data:`NUDGE_FRACTION` of the width in a random direction with room.

    Directions whose move keeps the bounding box in the frame are preferred; with none, any is
    taken and what would leave the frame is dropped.
    """
    step = max(1, int(round(NUDGE_FRACTION * mask.shape[1])))
    x0, x1, y0, y1 = shift_room(mask)
    moves = [(step, 0), (-step, 0), (0, step), (0, -step)]
    fits = [m for m in moves if x0 <= m[0] <= x1 and y0 <= m[1] <= y1]
    dx, dy = (fits or moves)[int(rng.integers(len(fits or moves)))]
    return translate_mask(mask, dx, dy), {"dx": dx, "dy": dy, "clipped": not fits}


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    return np.mgrid[0:h, 0:w].astype(np.float64) + 0.5  # pixel centres (y, x)


def ellipse_mask(shape: tuple[int, int], centre: tuple[float, float], area: float, aspect: float) -> np.ndarray:
    """An axis-aligned ellipse covering ``area`` of the image, width/height ``aspect``, centred at (x, y) px."""
    h, w = shape
    ry = math.sqrt(area * h * w / (math.pi * aspect))
    rx = aspect * ry
    yy, xx = _grid(shape)
    return ((xx - centre[0]) / rx) ** 2 + ((yy - centre[1]) / ry) ** 2 <= 1.0


def rectangle_mask(shape: tuple[int, int], centre: tuple[float, float], area: float, aspect: float) -> np.ndarray:
    """An axis-aligned rectangle covering ``area`` of the image, width/height ``aspect``, centred at (x, y) px."""
    h, w = shape
    rh = math.sqrt(area * h * w / aspect)
    rw = aspect * rh
    yy, xx = _grid(shape)
    return (np.abs(xx - centre[0]) <= rw / 2) & (np.abs(yy - centre[1]) <= rh / 2)


def scaled_mask(mask: np.ndarray, factor: float, centre: tuple[float, float]) -> np.ndarray:
    """``mask`` scaled by ``factor`` about its centroid and moved so the centroid sits at (x, y) px."""
    h, w = mask.shape
    cx, cy = _centroid(mask)
    yy, xx = _grid(mask.shape)
    sx = np.floor((xx - centre[0]) / factor + cx * w).astype(int)
    sy = np.floor((yy - centre[1]) / factor + cy * h).astype(int)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = np.zeros_like(mask)
    out[inside] = mask[sy[inside], sx[inside]]
    return out


def drawn_target(kind: str, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """An ``ellipse``, ``rectangle`` or ``scaled`` target at a random centre, wholly in the frame."""
    h, w = mask.shape
    if kind == "scaled":
        top, bottom, left, right = bounding_box(mask)
        cx, cy = _centroid(mask)
        cx, cy = cx * w, cy * h
        # The largest factor whose scaled box still fits the frame caps the draw.
        fit = min(w / (right - left + 1), h / (bottom - top + 1))
        factor = float(min(rng.uniform(*SCALE_RANGE), fit))
        half_l, half_r = (cx - left) * factor, (right + 1 - cx) * factor
        half_t, half_b = (cy - top) * factor, (bottom + 1 - cy) * factor
        centre = (float(rng.uniform(half_l, max(half_l, w - half_r))), float(rng.uniform(half_t, max(half_t, h - half_b))))
        return scaled_mask(mask, factor, centre), {"factor": factor, "centre": centre,
                                                   "area": float(mask.mean()) * factor**2}
    area = float(rng.uniform(*DRAWN_AREA))
    aspect = float(math.exp(rng.uniform(math.log(0.5), math.log(2.0))))
    if kind == "ellipse":
        ry = math.sqrt(area * h * w / (math.pi * aspect))
        half_w, half_h = aspect * ry, ry
        make = ellipse_mask
    elif kind == "rectangle":
        half_h = math.sqrt(area * h * w / aspect) / 2
        half_w = aspect * half_h
        make = rectangle_mask
    else:
        raise ValueError(f"unknown drawn target {kind!r}; expected ellipse, rectangle or scaled")
    centre = (float(rng.uniform(half_w, max(half_w, w - half_w))), float(rng.uniform(half_h, max(half_h, h - half_h))))
    return make((h, w), centre, area, aspect), {"centre": centre, "area": area, "aspect": aspect}


def make_target(kind: str, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One target of ``kind`` (:data:`TARGET_KINDS`) for an object whose mask is ``mask``."""
    if kind == "shift":
        return shift_target(mask, rng)
    if kind == "nudge":
        return nudge_target(mask, rng)
    return drawn_target(kind, mask, rng)
