"""Figures of probe results: emergence curves, site x step heat maps, per-step readout strips.

Figures are :class:`matplotlib.figure.Figure` objects built without pyplot (so no global backend
or figure registry is touched, and it works headless); :func:`save_figure` writes a PNG with the
Agg renderer. Inputs are plain data: the ``metrics.json`` dictionary and numpy arrays.

The app's per-step pictures (:func:`outline_picture`, :func:`colour_bar_picture`) are plain
numpy/PIL/OpenCV instead: they are drawn at every denoising step, where a matplotlib figure would
cost more than the step. Probe maps are upsampled bilinearly for display (a 16x16 grid shown at
256 px is otherwise a mosaic of blocks); the foreground mask is the upsampled logit margin above 0,
i.e. ``p > 0.5`` of the calibrated probe (calibration folds the threshold into the bias), the
same mask the evaluation scores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "emergence_figure", "heatmap_figure", "strips_figure", "save_figure", "write_probe_figures",
    "upsample_smooth", "foreground_margin", "outline_picture", "colour_bar_picture", "word_attention_picture",
    "picture_grid",
]

_BASELINE_STYLE = {
    "labeler_on_x0": ("labeler on x0 preview", "tab:orange", "--"),
    "latent_probe": ("latent probe", "tab:green", "-."),
    "permuted_unet": ("permuted UNet", "tab:red", ":"),
    "prior": ("layout prior", "tab:gray", (0, (1, 3))),
}


def _values(curve: Sequence[float | None] | None) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in (curve or [])], dtype=np.float64)


def _short(site: str) -> str:
    parts = site.split(".")
    if parts[0] == "mid_block":
        return "mid"
    return f"{parts[0].replace('_blocks', '')}{parts[1]}.{parts[3]}"


def _panel(ax: Any, title: str, ylabel: str, probe: np.ndarray, baselines: Mapping[str, Any], steps: np.ndarray) -> None:
    ax.plot(steps, probe, color="tab:blue", lw=2.2, marker="o", ms=3, label="probe (best site)")
    for name, (label, colour, style) in _BASELINE_STYLE.items():
        curve = _values(baselines.get(name))
        if curve.size and np.isfinite(curve).any():
            ax.plot(steps, curve, color=colour, ls=style, lw=1.5, label=label)
    ax.set_title(title)
    ax.set_xlabel("denoising step")
    ax.set_ylabel(ylabel)
    ax.set_xticks(steps[:: max(1, len(steps) // 8)])
    ax.grid(alpha=0.3)


def emergence_figure(metrics: Mapping[str, Any]) -> Figure:
    """Best-site probe score per step for each task, with the baselines (depth also residual)."""
    tasks = metrics["tasks"]
    panels = []
    for task, t in tasks.items():
        panels.append((f"{task} ({t['metric']})", t["metric"], _values(t["best_per_step"]), t["baselines"]))
        if task == "depth" and "residual_best_per_step" in t:
            panels.append(("depth, residual (prior removed)", "spearman", _values(t["residual_best_per_step"]),
                           t.get("baselines_residual", {})))
    steps = np.arange(1, int(metrics["num_steps"]) + 1)
    fig = Figure(figsize=(4.2 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ylabel, probe, baselines) in zip(axes, panels):
        _panel(ax, title, ylabel, probe, baselines, steps)
    # One legend below all panels: inside a panel it covered that panel's curves.
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), fontsize=8, loc="outside lower center",
               ncols=max(1, len(entries)), frameon=False)
    fig.suptitle(f"{metrics['model']}: what linear probes read at each step (test split, n={metrics['n_test']})")
    return fig


def heatmap_figure(metrics: Mapping[str, Any], task: str, key: str = "probe") -> Figure:
    """Site x step heat map of a task's test scores (``key``: ``probe``, ``residual`` or ``iou``)."""
    t = metrics["tasks"][task]
    table = t[key]
    sites = list(table)
    data = np.stack([_values(table[s]) for s in sites])
    steps = data.shape[1]
    fig = Figure(figsize=(1.2 + 0.42 * steps, 1.2 + 0.32 * len(sites)), layout="constrained")
    ax = fig.subplots()
    finite = data[np.isfinite(data)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=vmin, vmax=1.0)
    ax.set_yticks(range(len(sites)), [_short(s) for s in sites], fontsize=7)
    ax.set_xticks(range(steps), [str(i + 1) for i in range(steps)], fontsize=7)
    ax.set_xlabel("denoising step")
    best = t.get("best_site_per_step")
    if best and key in ("probe", "residual", "iou"):
        ax.scatter(range(steps), [sites.index(s) for s in best], marker="o", s=12, c="white", edgecolors="black",
                   linewidths=0.5, label="best site (validation)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12), frameon=False)
    fig.colorbar(im, ax=ax, label=t["metric"] if key == "probe" else key)
    ax.set_title(f"{task}: {t['metric'] if key == 'probe' else key} per site and step")
    return fig


def _tile(data: np.ndarray, size: int, cmap: str | None = None, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """One map or RGB image as a ``size x size`` float RGB tile (nearest resampling, colour-mapped)."""
    from matplotlib import colormaps

    data = np.asarray(data)
    if data.ndim == 2:
        scaled = np.clip((data.astype(np.float64) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        data = colormaps[cmap or "viridis"](scaled)[..., :3]
    elif data.dtype == np.uint8:
        data = data.astype(np.float64) / 255.0
    rows = (np.arange(size) * data.shape[0] // size)[:, None]
    cols = (np.arange(size) * data.shape[1] // size)[None, :]
    return data[rows, cols]


def strips_figure(examples: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any] | None = None, tile: int = 64) -> Figure:
    """Per-step readouts of example test images: x0 preview, then one row per task's probe readout.

    Each example dict holds ``x0`` ``[S, H, W, 3]`` uint8, ``probe/<task>`` ``[S, h, w]`` (at the
    task's best site, on its token grid), ``image`` and ``label/<task>`` (shown in a last "final"
    column), and ``prompt``/``seed``. The tiles are composed into one image (a figure with one axes
    per tile is slow to lay out at 15 steps), nearest-resampled to ``tile`` pixels.
    """
    if not examples:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no example images", ha="center", va="center")
        return fig
    tasks = [k.split("/", 1)[1] for k in examples[0] if k.startswith("probe/")]
    steps = int(np.asarray(examples[0]["x0"]).shape[0])
    rows_per = 1 + len(tasks)
    gap = max(2, tile // 16)
    height = len(examples) * (rows_per * (tile + gap) + 3 * gap)
    width = (steps + 1) * (tile + gap) + gap
    canvas = np.ones((height, width, 3))
    cmaps = {"foreground": ("gray", 0.0, 1.0), "depth": ("magma_r", None, None), "shading": ("gray", 0.0, 1.0)}
    row_labels: list[tuple[int, str]] = []
    y = 0
    for ex in examples:
        ranges = {}
        for task in tasks:
            ref = np.asarray(ex.get(f"label/{task}", ex[f"probe/{task}"]))
            cmap, lo, hi = cmaps.get(task, ("viridis", None, None))
            ranges[task] = (cmap, float(ref.min()) if lo is None else lo, float(ref.max()) if hi is None else hi)
        for r in range(rows_per):
            task = None if r == 0 else tasks[r - 1]
            row_labels.append((y + tile // 2, "x0 preview" if task is None else f"{task} probe"))
            for s in range(steps + 1):
                final = s == steps
                if task is None:
                    data, cm, lo, hi = (ex["image"] if final else np.asarray(ex["x0"])[s]), None, 0.0, 1.0
                else:
                    data = ex.get(f"label/{task}") if final else np.asarray(ex[f"probe/{task}"])[s]
                    cm, lo, hi = ranges[task]
                if data is None:
                    continue
                x = gap + s * (tile + gap)
                canvas[y : y + tile, x : x + tile] = _tile(data, tile, cm, lo, hi)
            y += tile + gap
        y += 3 * gap
    fig = Figure(figsize=(width / 80 + 1.6, height / 80 + 0.8))
    ax = fig.add_axes((0.1, 0.02, 0.88, 0.9))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([gap + s * (tile + gap) + tile / 2 for s in range(steps + 1)],
                  [str(s + 1) for s in range(steps)] + ["final"], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([c for c, _ in row_labels], [label for _, label in row_labels], fontsize=7)
    for spine in ax.spines.values():
        spine.set_visible(False)
    title = "probe readouts per denoising step (best site per task); last column: final image and its labels"
    if metrics is not None:
        title = f"{metrics['model']}: {title}"
    prompts = "; ".join(f"seed {ex.get('seed', '?')}: {ex.get('prompt', '')}" for ex in examples)
    fig.suptitle(f"{title}\n{prompts[:160]}", fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG with the Agg renderer; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def write_probe_figures(metrics: Mapping[str, Any], examples: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """``emergence.png``, ``heatmap_<task>.png`` per task and ``strips.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [save_figure(emergence_figure(metrics), out_dir / "emergence.png")]
    for task in metrics["tasks"]:
        paths.append(save_figure(heatmap_figure(metrics, task), out_dir / f"heatmap_{task}.png"))
    paths.append(save_figure(strips_figure(examples, metrics), out_dir / "strips.png", dpi=100))
    return paths


# --- per-step pictures for the app ---------------------------------------------------------------

#: Colour of the foreground outline and of the colour bar's text.
OUTLINE_RGB = (255, 40, 40)


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
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    values = upsample_smooth(np.nan_to_num(np.asarray(values, np.float32), nan=vmin), (size, size))
    span = vmax - vmin if np.isfinite(vmax - vmin) and vmax > vmin else 1.0
    colours = colormaps[cmap]
    tile = colours(((values - vmin) / span).clip(0.0, 1.0), bytes=True)[..., :3]
    bar_w, text_w, pad = max(10, size // 20), max(64, size // 4), 6
    canvas = Image.new("RGB", (size + pad + bar_w + text_w, size), (255, 255, 255))
    canvas.paste(Image.fromarray(tile), (0, 0))
    ramp = colours(np.linspace(1.0, 0.0, size)[:, None].repeat(bar_w, 1), bytes=True)[..., :3]
    x0 = size + pad
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (x0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x0, 0, x0 + bar_w - 1, size - 1), outline=(0, 0, 0))
    tx = x0 + bar_w + 4
    top = f">{vmax:.3g}" if float(np.nanmax(values)) > vmax else f"{vmax:.3g}"
    bottom = f"<{vmin:.3g}" if float(np.nanmin(values)) < vmin else f"{vmin:.3g}"
    draw.text((tx, 2), top, fill=(0, 0, 0))
    if high_note:
        draw.text((tx, 14), high_note, fill=(80, 80, 80))
    draw.text((tx, size // 2 - 6), f"{(vmin + vmax) / 2:.3g}", fill=(0, 0, 0))
    draw.text((tx, size // 2 + 8), label[:14], fill=(80, 80, 80))
    if low_note:
        draw.text((tx, size - 26), low_note, fill=(80, 80, 80))
    draw.text((tx, size - 13), bottom, fill=(0, 0, 0))
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
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    maps = np.nan_to_num(np.asarray(maps, np.float32), nan=0.0)
    n = len(words)
    title_h, foot_h, pad = 16, 22, 4
    canvas = Image.new("RGB", ((n + 1) * (tile + pad) - pad, title_h + tile + foot_h), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_enlarge_rgb(image, tile), (0, title_h))
    draw.text((2, 2), "x0 estimate", fill=(0, 0, 0))
    top = float(maps.max()) if maps.size else 0.0
    scale = top if top > 0 else 1.0
    colours = colormaps[cmap]
    for i, word in enumerate(words):
        heat = colours((upsample_smooth(maps[i], (tile, tile)) / scale).clip(0, 1), bytes=True)[..., :3]
        x = (i + 1) * (tile + pad)
        canvas.paste(Image.fromarray(np.ascontiguousarray(heat)), (x, title_h))
        draw.text((x + 2, 2), f'"{str(word)[:16]}"', fill=(0, 0, 0))
    if n:
        x0, width, y = tile + pad, min(tile, 160), title_h + tile + 4
        ramp = colours(np.linspace(0, 1, width)[None].repeat(8, 0), bytes=True)[..., :3]
        canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (x0 + 10, y + 4))
        draw.text((x0, y + 2), "0", fill=(0, 0, 0))
        draw.text((x0 + width + 14, y + 2), f"{top:.3g}: share of each pixel's attention", fill=(0, 0, 0))
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
        draw.text((int(xs[j]) + 2, 2), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = head + i * (tile + pad)
        draw.text((2, y + tile // 2 - 6), row_titles[i][:13], fill=(0, 0, 0))
        for j, cell in enumerate(row):
            x = int(xs[j])
            if cell is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(235, 235, 235))
                text = missing if isinstance(missing, str) else missing[j]
                draw.text((x + 6, y + tile // 2 - 6), text, fill=(90, 90, 90))
                continue
            fitted = cell.convert("RGB").resize((round(cell.width * tile / cell.height), tile), Image.BILINEAR)
            canvas.paste(fitted, (x, y))
    return canvas
