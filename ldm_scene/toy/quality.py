"""Judging a generated toy image against its prompt, with the shipped labelers (no ground truth).

A generated image has no exact labels, exactly as SD's images don't; so, as the paper used TRACER
and MiDaS, the shipped labeler finds the object, the shipped classifier names its shape, the mean
hue inside the mask names its colour; the mask's centroid and coverage say where and how big the
object is (a prompt never says where: the report compares them with the renderer's).
"""
from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

import numpy as np

from .render import COLOURS, PLACE_WORDS, SHAPES, colour_hues

#: Masks smaller than this fraction of the image count as "no object".
MIN_OBJECT_FRACTION = 0.002

_PROMPT = re.compile(r"^an? (\w+) (\w+)$")


@dataclass(frozen=True)
class PromptWords:
    colour: str
    shape: str


def parse_prompt(prompt: str) -> PromptWords:
    """Read colour and shape words from a toy prompt ("a red cone")."""
    m = _PROMPT.match(prompt.strip().lower())
    if not m or m[1] not in COLOURS or m[2] not in SHAPES:
        places = sorted(PLACE_WORDS & set(prompt.lower().split()))
        hint = f"; toy prompts never say where the object is ({', '.join(places)})" if places else ""
        raise ValueError(f"not a toy prompt: {prompt!r} (expected e.g. 'a red cone'){hint}")
    return PromptWords(m[1], m[2])


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def mask_colour(image: np.ndarray, mask: np.ndarray) -> str | None:
    """The named colour whose hue is nearest the mean colour inside ``mask`` (None if empty)."""
    if not mask.any():
        return None
    rgb = np.asarray(image, dtype=np.float64)[mask].mean(0)
    if rgb.max() > 1.0:
        rgb = rgb / 255.0
    hue = colorsys.rgb_to_hsv(*rgb)[0] * 360.0
    return min(colour_hues().items(), key=lambda kv: hue_distance(hue, kv[1]))[0]


def mask_centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """The mask's centroid (x, y) as fractions of the image width and height (None if empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    return float((cols.mean() + 0.5) / mask.shape[1]), float((rows.mean() + 0.5) / mask.shape[0])


def has_object(mask: np.ndarray) -> bool:
    return bool(mask.mean() >= MIN_OBJECT_FRACTION)
