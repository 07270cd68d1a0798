"""The app's display pictures, drawn at every denoising step: probe maps, outlines, colour bars, word maps.

They are plain numpy/PIL/OpenCV instead of matplotlib figures: they are drawn at every denoising step,
where a matplotlib figure would cost more than the step. Probe maps are upsampled bilinearly for
display (a 16x16 grid shown at 256 px is otherwise a mosaic of blocks); the foreground mask is the
upsampled logit margin above 0, i.e. ``p > 0.5`` of the calibrated probe (calibration folds the
threshold into the bias), the same mask the evaluation scores. Research figures (a probe run's
emergence curves, heat maps and readout strips; classifier curves) are in :mod:`ldm_scene.figures`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = [
    "coloured", "draw_text", "fast_encoding", "upsample_smooth", "foreground_margin", "outline_picture",
    "colour_bar_picture", "word_attention_picture", "picture_grid",
]

#: Colour of the foreground outline and of the colour bar's text.
OUTLINE_RGB = (255, 40, 40)


@lru_cache(maxsize=32)
def _lut(cmap: str) -> np.ndarray:
    """``cmap``'s 256 colours as ``uint8 [256, 3]`` (looked up once; matplotlib is slow per call)."""
    from matplotlib import colormaps

    return colormaps[cmap](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3].copy()


def coloured(unit: np.ndarray, cmap: str) -> np.ndarray:
    """Values in ``[0, 1]`` through ``cmap`` as ``uint8 [..., 3]``: the colours matplotlib's
    ``colormaps[cmap](unit, bytes=True)`` gives (same 256-entry table, same indexing), several
    times faster, which matters for pictures drawn at every denoising step."""
    index = np.clip(np.asarray(unit, np.float32) * 256, 0, 255).astype(np.uint8)
    return _lut(cmap)[index]


@lru_cache(maxsize=1024)
def _text_mask(text: str) -> tuple["Image.Image", tuple[int, int]]:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    return mask, (left, top)


def draw_text(canvas: "Image.Image", xy: tuple[int, int], text: str, fill: tuple[int, int, int] = (0, 0, 0)) -> None:
    """``ImageDraw.text(xy, text, fill)`` with the default font, each text rendered once and kept:
    the step pictures repeat the same labels every step, and rendering them was most of their cost."""
    if not text:
        return
    mask, (left, top) = _text_mask(text)
    canvas.paste(fill, (int(xy[0]) + left, int(xy[1]) + top), mask)


#: zlib level for the step pictures' PNGs: level 1 encodes ~3x faster than Pillow's default (6)
#: for files ~1.5x larger, and a stream encodes several pictures per denoising step.
FAST_PNG_LEVEL = 1
#: JPEG quality for the pictures the live stream sends every step (the readouts): on a 256 px
#: readout with its colour bar JPEG encodes ~15x faster than a level-1 PNG, in a fifth of the bytes,
#: and at 90 the smooth maps, outlines and labels show no visible artefacts.
FAST_JPEG_QUALITY = 90


def fast_encoding(image: "Image.Image | None") -> "Image.Image | None":
    """``image`` set to be saved quickly by whoever saves it (Gradio does, with no options): a PNG at
    zlib level :data:`FAST_PNG_LEVEL`, a JPEG at quality :data:`FAST_JPEG_QUALITY`, whichever
    format the component asks for. Pillow reads save options from the image's ``encoderinfo`` too
    (``Image.save``), and each format ignores the other's key."""
    if image is not None:
        image.encoderinfo = {**getattr(image, "encoderinfo", {}), "compress_level": FAST_PNG_LEVEL,
                             "quality": FAST_JPEG_QUALITY}
    return image


def upsample_smooth(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to ``(height, width)`` (pixel centres aligned, as
    ``F.interpolate(..., mode="bilinear", align_corners=False)``)."""
    from PIL import Image

    values = np.asarray(values, np.float32)
    h, w = int(size[0]), int(size[1])
    if values.shape == (h, w):
        return values
    return np.asarray(Image.fromarray(values, mode="F").resize((w, h), Image.BILINEAR), np.float32)


def foreground_margin(prob: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """The logit margin ``log(p / (1 - p))`` of foreground probabilities (0 at ``p = 0.5``).

    Upsampling the margin and thresholding at 0 is exact for a linear probe, whose margin is
    linear in the activations; upsampling ``p`` would bend the boundary through the sigmoid.
    """
    p = np.clip(np.nan_to_num(np.asarray(prob, np.float64), nan=0.0), eps, 1 - eps)
    return np.log(p / (1 - p)).astype(np.float32)


def outline_picture(image: "Image.Image", prob: np.ndarray | None, size: int, colour: tuple[int, int, int] = OUTLINE_RGB,
                    thickness: int | None = None) -> "Image.Image":
    """``image`` at ``size`` px with the outline of the foreground ``prob > 0.5`` drawn over it.

    ``prob`` is the probe's foreground probability on any grid (or a bool mask at any size);
    it is upsampled bilinearly (as its logit margin) to ``size`` before thresholding, so the
    outline is smooth instead of following grid cells. The image itself is not tinted.
    """
    import cv2
    from PIL import Image

    base = np.array(_enlarge_rgb(image, size))
    if prob is None:
        return Image.fromarray(base)
    prob = np.asarray(prob)
    if prob.dtype == bool:
        margin = prob.astype(np.float32) - 0.5
    else:
        margin = foreground_margin(prob)
    mask = (upsample_smooth(margin, (size, size)) > 0).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    width = thickness or max(1, size // 128)
    # A dark halo under the colour keeps the line visible on red objects and bright skies alike.
    cv2.drawContours(base, contours, -1, (0, 0, 0), width + 2, lineType=cv2.LINE_AA)
    cv2.drawContours(base, contours, -1, tuple(int(c) for c in colour), width, lineType=cv2.LINE_AA)
    return Image.fromarray(base)


def colour_bar_picture(values: np.ndarray, vmin: float, vmax: float, cmap: str, size: int, label: str,
                       low_note: str = "", high_note: str = "") -> "Image.Image":
    """A 2-D map through ``cmap`` over the fixed range ``[vmin, vmax]``, bilinearly upsampled to
    ``size`` px, with a colour bar on the right: the range's ends, its middle, and ``label``.

    Values outside the range are clipped to its ends (the bar says so with ``<`` and ``>``);
    NaN is drawn as the low end. ``low_note``/``high_note`` say what the ends mean ("near").
    """
    from PIL import Image

    values = upsample_smooth(np.nan_to_num(np.asarray(values, np.float32), nan=vmin), (size, size))
    span = vmax - vmin if np.isfinite(vmax - vmin) and vmax > vmin else 1.0
    # The bar and its labels are the same at every step of a run: drawn once, then copied.
    canvas = _bar_canvas(float(vmin), float(vmax), cmap, size, label, low_note, high_note,
                         float(np.nanmax(values)) > vmax, float(np.nanmin(values)) < vmin).copy()
    canvas.paste(Image.fromarray(coloured((values - vmin) / span, cmap)), (0, 0))
    return canvas


@lru_cache(maxsize=64)
def _bar_canvas(vmin: float, vmax: float, cmap: str, size: int, label: str, low_note: str, high_note: str,
                over: bool, under: bool) -> "Image.Image":
    """:func:`colour_bar_picture`'s canvas without its map: white where the map goes, the bar and labels."""
    from PIL import Image, ImageDraw

    bar_w, text_w, pad = max(10, size // 20), max(64, size // 4), 6
    canvas = Image.new("RGB", (size + pad + bar_w + text_w, size), (255, 255, 255))
    ramp = coloured(np.linspace(1.0, 0.0, size)[:, None].repeat(bar_w, 1), cmap)
    x0 = size + pad
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (x0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x0, 0, x0 + bar_w - 1, size - 1), outline=(0, 0, 0))
    tx = x0 + bar_w + 4
    draw_text(canvas, (tx, 2), f">{vmax:.3g}" if over else f"{vmax:.3g}", (0, 0, 0))
    if high_note:
        draw_text(canvas, (tx, 14), high_note, (80, 80, 80))
    draw_text(canvas, (tx, size // 2 - 6), f"{(vmin + vmax) / 2:.3g}", (0, 0, 0))
    draw_text(canvas, (tx, size // 2 + 8), label[:14], (80, 80, 80))
    if low_note:
        draw_text(canvas, (tx, size - 26), low_note, (80, 80, 80))
    draw_text(canvas, (tx, size - 13), f"<{vmin:.3g}" if under else f"{vmin:.3g}", (0, 0, 0))
    return canvas


def _enlarge_rgb(image: "Image.Image", size: int) -> "Image.Image":
    from PIL import Image

    image = image.convert("RGB")
    if image.size == (size, size):
        return image
    # Small images blown up 2x or more keep their pixels sharp (each model pixel stays visible);
    # maps, which are smooth fields, are upsampled bilinearly instead (upsample_smooth).
    resample = Image.NEAREST if max(image.size) * 2 <= size else Image.BILINEAR
    return image.resize((size, size), resample)


def word_attention_picture(image: "Image.Image", maps: np.ndarray, words: Sequence[str], tile: int,
                           cmap: str = "inferno") -> "Image.Image":
    """The image, then each word's attention map as a heat map: one tile each, one shared scale.

    ``maps`` is ``[n_words, h, w]`` (any grid, upsampled bilinearly to ``tile`` px). All words share
    one colour range, 0 to the largest value at this step, drawn as a bar under the tiles, so the
    tiles compare words with each other (which word the image attends to where), not each word
    with itself.
    """
    from PIL import Image

    maps = np.nan_to_num(np.asarray(maps, np.float32), nan=0.0)
    n = len(words)
    title_h, foot_h, pad = 16, 22, 4
    canvas = Image.new("RGB", ((n + 1) * (tile + pad) - pad, title_h + tile + foot_h), "white")
    canvas.paste(_enlarge_rgb(image, tile), (0, title_h))
    draw_text(canvas, (2, 2), "x0 estimate", (0, 0, 0))
    top = float(maps.max()) if maps.size else 0.0
    scale = top if top > 0 else 1.0
    for i, word in enumerate(words):
        heat = coloured(upsample_smooth(maps[i], (tile, tile)) / scale, cmap)
        x = (i + 1) * (tile + pad)
        canvas.paste(Image.fromarray(np.ascontiguousarray(heat)), (x, title_h))
        draw_text(canvas, (x + 2, 2), f'"{str(word)[:16]}"', (0, 0, 0))
    if n:
        x0, width, y = tile + pad, min(tile, 160), title_h + tile + 4
        ramp = coloured(np.linspace(0, 1, width)[None].repeat(8, 0), cmap)
        canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (x0 + 10, y + 4))
        draw_text(canvas, (x0, y + 2), "0", (0, 0, 0))
        draw_text(canvas, (x0 + width + 14, y + 2), f"{top:.3g}: share of each pixel's attention", (0, 0, 0))
    return canvas


def picture_grid(rows: Sequence[Sequence["Image.Image | None"]], column_titles: Sequence[str],
                 row_titles: Sequence[str], tile: int, missing: str | Sequence[str] = "not yet") -> "Image.Image":
    """Pictures in a titled grid (each cell fitted to ``tile`` px, kept whole); None cells say ``missing``
    (one text, or one per column)."""
    from PIL import Image, ImageDraw

    left, head, pad = 84, 16, 4
    ncol = len(column_titles)
    widths = [tile] * ncol
    for row in rows:
        for j, cell in enumerate(row):
            if cell is not None:
                widths[j] = max(widths[j], round(cell.width * tile / cell.height))
    xs = np.concatenate([[left], left + np.cumsum([w + pad for w in widths])])
    canvas = Image.new("RGB", (int(xs[-1]), head + len(rows) * (tile + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(column_titles):
        draw_text(canvas, (int(xs[j]) + 2, 2), title, (0, 0, 0))
    for i, row in enumerate(rows):
        y = head + i * (tile + pad)
        draw_text(canvas, (2, y + tile // 2 - 6), row_titles[i][:13], (0, 0, 0))
        for j, cell in enumerate(row):
            x = int(xs[j])
            if cell is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(235, 235, 235))
                text = missing if isinstance(missing, str) else missing[j]
                draw_text(canvas, (x + 6, y + tile // 2 - 6), text, (90, 90, 90))
                continue
            fitted = cell.convert("RGB").resize((round(cell.width * tile / cell.height), tile), Image.BILINEAR)
            canvas.paste(fitted, (x, y))
    return canvas
