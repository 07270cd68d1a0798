"""How a run's steps look on the page: readout pictures, per-word attention, the compare strip.

Plain numpy and PIL over :mod:`ldm_scene.viz`; the service builds one :class:`Painter` and asks it
for a :class:`~.views.StepView` per step, live and when the scrubber revisits a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image

from ..probes import TASKS, ProbeBank
from ..readout import value_range
from ..viz import (
    colour_bar_picture, coloured, fast_encoding, outline_picture, picture_grid, upsample_smooth, word_attention_picture,
)
from .views import Run, StepView

#: How depth and shading maps are drawn: colour map, and what its low and high ends mean.
MAP_STYLE = {"depth": ("magma_r", "near", "far"), "shading": ("gray", "dark", "lit")}
#: The colour of a target mask (the probes' foreground outline is red).
TARGET_RGB = (0, 220, 255)
#: The side, in pixels, of each tile of the attention and compare strips.
STRIP_TILE = 128


def enlarge(image: Image.Image, size: int) -> Image.Image:
    """``image`` as RGB at ``size`` px a side (pixels kept sharp when blown up 2x or more)."""
    image = image.convert("RGB")
    if image.size == (size, size):
        return image
    resample = Image.NEAREST if max(image.size) * 2 <= size else Image.BILINEAR
    return image.resize((size, size), resample)


@dataclass
class Painter:
    """Draws steps at ``size`` px; ``banks`` give depth and shading their fixed colour ranges."""

    banks: Mapping[str, ProbeBank]
    size: int

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Each depth/shading bank's fixed colour range (its target mean +- 2 standard deviations)."""
        return {t: value_range(b) for t, b in self.banks.items() if t != "foreground"}

    def step(self, run: Run, step: int, image: Image.Image | None, strips: bool = True) -> StepView:
        """The :class:`StepView` of 0-based ``step`` of ``run`` (``image``: the final image, on the last step).

        A step whose preview was not decoded is drawn over the latest decoded one (the view's
        ``preview_step`` says which). ``strips=False`` leaves out the attention and compare strips
        and the foreground heat map (the live stream sends them at decoded steps only).
        """
        shown_step = run.shown_step(step)
        preview = run.previews[shown_step]
        maps = run.readouts[step]
        overlays, heat = {}, None
        ranges = self.ranges()
        for task, values in maps.items():
            if task == "foreground":
                overlays[task] = outline_picture(preview, values, self.size)
                if strips:
                    heat = colour_bar_picture(values, 0.0, 1.0, "viridis", self.size, "p(object)", "background",
                                              "object")
            else:
                cmap, low, high = MAP_STYLE.get(task, ("viridis", "", ""))
                lo, hi = ranges.get(task, (float(np.nanmin(values)), float(np.nanmax(values))))
                overlays[task] = colour_bar_picture(values, lo, hi, cmap, self.size, task, low, high)
        shown = image if image is not None else preview
        overlays = {t: fast_encoding(p) for t, p in overlays.items()}
        return StepView(step, run.config.steps, run.timesteps[step], fast_encoding(enlarge(shown, self.size)), overlays,
                        maps, run, image, fast_encoding(heat), fast_encoding(self.attention(run, step)) if strips else None,
                        fast_encoding(self.compare(run, step)) if strips else None, shown_step)

    def attention(self, run: Run, step: int) -> Image.Image | None:
        """The prompt words' cross-attention maps at ``step`` over its preview (None if none were read)."""
        words = run.attention[step] if step < len(run.attention) else None
        if words is None or not words.per_site:
            return None
        return word_attention_picture(run.previews[run.shown_step(step)], words.mean(), words.words, STRIP_TILE)

    def compare(self, run: Run, step: int) -> Image.Image | None:
        """One row per task: the probe at ``step``, the labeler on the step's x0 preview, the final label."""
        maps = run.readouts[step]
        labels = run.preview_labels[step] if step < len(run.preview_labels) else None
        if not maps and labels is None:
            return None
        final = run.reference if run.reference_source.startswith("the labeler") else {}
        tasks = [t for t in TASKS if t in maps or (labels and t in labels)]
        ranges = self.ranges()
        backdrop = run.previews[run.shown_step(step)]
        rows = []
        for task in tasks:
            def cell(values: np.ndarray | None, over: Image.Image | None, bar: bool = False) -> Image.Image | None:
                if values is None or over is None:
                    return None
                if task == "foreground":
                    return outline_picture(over, np.asarray(values, np.float32), STRIP_TILE)
                lo, hi = ranges.get(task, (float(np.nanmin(values)), float(np.nanmax(values))))
                cmap, low, high = MAP_STYLE.get(task, ("viridis", "", ""))
                if bar:
                    return colour_bar_picture(values, lo, hi, cmap, STRIP_TILE, task, low, high)
                return _coloured(values, lo, hi, cmap)

            rows.append([
                cell(maps.get(task), backdrop),
                cell(labels.get(task) if labels else None, run.previews[step]),
                cell(final.get(task), run.image, bar=True),
            ])
        k = step + 1
        return picture_grid(rows, [f"probe, step {k}", f"labeler on x0, step {k}", "final image's label"], tasks,
                            STRIP_TILE, missing=["no readout",
                                                 "no labeler" if run.previews[step] is not None else "not decoded yet",
                                                 "when finished" if run.image is None else "no labeler"])

    def display(self, image: Image.Image) -> Image.Image:
        """``image`` at the display size."""
        return enlarge(image, self.size)

    def outline(self, image: Image.Image, mask: np.ndarray | None) -> Image.Image:
        """``image`` at the display size with ``mask``'s outline (the image itself untouched)."""
        return outline_picture(image, None if mask is None else np.asarray(mask, bool), self.size)

    def mask_picture(self, mask: np.ndarray, over: Image.Image | None = None) -> Image.Image:
        """A target mask drawn for the UI: a light cyan tint with a cyan outline over ``over`` (the image
        it belongs to; cyan stays visible on the red objects the probes' outlines use), or white on black."""
        if over is None:
            return enlarge(Image.fromarray((np.asarray(mask) * 255).astype(np.uint8)), self.size)
        base = np.asarray(enlarge(over, self.size), np.float32)
        inside = upsample_smooth(np.asarray(mask, np.float32), (self.size, self.size))[..., None] * 0.35
        tinted = Image.fromarray((base * (1 - inside) + np.array(TARGET_RGB, np.float32) * inside).round()
                                 .clip(0, 255).astype(np.uint8))
        return outline_picture(tinted, np.asarray(mask, bool), self.size, colour=TARGET_RGB)


def _coloured(values: np.ndarray, lo: float, hi: float, cmap: str) -> Image.Image:
    span = hi - lo if np.isfinite(hi - lo) and hi > lo else 1.0
    smooth = upsample_smooth(np.nan_to_num(np.asarray(values, np.float32), nan=lo), (STRIP_TILE, STRIP_TILE))
    return Image.fromarray(coloured((smooth - lo) / span, cmap))
