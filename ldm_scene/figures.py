"""The research figures ldm-scene writes next to its results (matplotlib, no pyplot state).

- :func:`write_probe_figures`: a probe run's ``emergence.png`` (:func:`emergence_figure`), ``heatmap_<task>.png``
  (:func:`heatmap_figure`) and ``strips.png`` (:func:`strips_figure`), saved with :func:`save_figure`;
- :func:`controls_figure`: a probe run's curves beside what could explain them away (``controls.png``);
- :func:`plot_run_curves`: one run's classifier confidence per step (the classifier report and the app);
- :func:`plot_timelines`: when the classifier names the object vs when probes read the scene.

Each ``*_figure``/``plot_*`` returns a ``matplotlib.figure.Figure`` built from plain data (the
``metrics.json`` dictionary, numpy arrays, JSON results); the caller saves it. matplotlib is imported
when a figure is drawn, not with this module. (The app's per-step display pictures are in
:mod:`ldm_scene.viz`.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .classify.curves import RunCurves

__all__ = [
    "emergence_figure", "heatmap_figure", "strips_figure", "save_figure", "write_probe_figures",
    "controls_figure", "plot_run_curves", "plot_timelines",
]


# --- a probe run's controls --------------------------------------------------------------------
# One column per task (and depth's residual): on top the probe's score per step (validation-chosen
# site) with its grid ceiling, the prompt-only baseline, the same-prompt control and the labeler on
# the decoded x0 preview; below, the probe's margins over those three baselines with their 95%
# bootstrap intervals as bands.

_CURVES = (
    ("grid_ceiling", "grid ceiling (site's grid)", "black", "--"),
    ("prompt_only", "prompt-only", "tab:purple", "-."),
    ("same_prompt_control", "same-prompt control", "tab:brown", ":"),
    ("labeler_on_x0", "labeler on x0 preview", "tab:orange", "--"),
)
_MARGINS = (
    ("prompt_only", "probe − prompt-only", "tab:purple"),
    ("same_prompt_control", "probe − same-prompt control", "tab:brown"),
    ("labeler_on_x0", "probe − labeler on x0", "tab:orange"),
)


def _values(curve: Sequence[float | None] | None) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in (curve or [])], dtype=np.float64)


def _panels(metrics: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    out = []
    for task, t in metrics["tasks"].items():
        curves = {"probe": t["best_per_step"], "grid_ceiling": t.get("grid_ceiling_best_per_step"), **t["baselines"]}
        out.append((f"{task} ({t['metric']})", t["metric"], {"curves": curves, "margins": t.get("margins", {})}))
        if task == "depth" and "residual_best_per_step" in t:
            curves = {"probe": t["residual_best_per_step"], "grid_ceiling": t.get("residual_grid_ceiling_best_per_step"),
                      **t.get("baselines_residual", {})}
            out.append(("depth, residual (prior removed)", "spearman", {"curves": curves, "margins": t.get("margins_residual", {})}))
    return out


def controls_figure(metrics: Mapping[str, Any]) -> Figure:
    """Probe vs grid ceiling, prompt-only, same-prompt control and labeler on x0; margins with 95% bands."""
    from matplotlib.figure import Figure

    panels = _panels(metrics)
    steps = np.arange(1, int(metrics["num_steps"]) + 1)
    fig = Figure(figsize=(4.2 * len(panels), 6.4), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex=True)
    for col, (title, ylabel, data) in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        top.plot(steps, _values(data["curves"]["probe"]), color="tab:blue", lw=2.2, marker="o", ms=3, label="probe (best site)")
        for key, label, colour, style in _CURVES:
            curve = _values(data["curves"].get(key))
            if curve.size and np.isfinite(curve).any():
                top.plot(steps, curve, color=colour, ls=style, lw=1.5, label=label)
        top.set_title(title)
        top.set_ylabel(ylabel)
        top.grid(alpha=0.3)
        bottom.axhline(0.0, color="gray", lw=0.8)
        for key, label, colour in _MARGINS:
            margin = data["margins"].get(key) or {}
            mean = _values(margin.get("mean"))
            if not mean.size or not np.isfinite(mean).any():
                continue
            bottom.plot(steps, mean, color=colour, lw=1.6, label=label)
            low, high = _values(margin.get("ci95_low")), _values(margin.get("ci95_high"))
            bottom.fill_between(steps, low, high, color=colour, alpha=0.2, lw=0)
        bottom.set_xlabel("denoising step")
        bottom.set_ylabel(f"margin ({ylabel})")
        bottom.set_xticks(steps[:: max(1, len(steps) // 8)])
        bottom.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    axes[1, 0].legend(fontsize=7, loc="best")
    boot = metrics.get("bootstrap", {})
    fig.suptitle(f"{metrics['model']}: probes beside the controls that could explain them (test split, "
                 f"n={metrics['n_test']}; bands: 95% bootstrap, {boot.get('resamples', '?')} resamples)")
    return fig


# --- classifier curves -----------------------------------------------------------------------

def shown_classes(curves: "RunCurves", max_classes: int = 5) -> list[int]:
    """The classes worth drawing for one run: the prompted class, the classes that were ever top-1,
    topped up with the highest-peaking others, ``max_classes`` in all (indices into ``curves.classes``)."""
    probs = curves.probabilities
    chosen: list[int] = []
    if curves.prompted_class is not None:
        chosen.append(curves.prompted_class)
    peaks = probs.max(axis=0) if len(curves.steps) else np.zeros(len(curves.classes))
    for j in list(dict.fromkeys(curves.top1.tolist())) + list(np.argsort(-peaks, kind="stable")):
        if len(chosen) >= max_classes:
            break
        if int(j) not in chosen:
            chosen.append(int(j))
    return chosen


def plot_run_curves(curves: "RunCurves", max_classes: int = 5) -> Figure:
    """Confidence over steps of the classes that matter in one run; the first correct step marked.

    Drawn: the prompted class (thick) and the classes that were ever top-1, topped up with the
    highest-peaking others, ``max_classes`` in all. Returns a matplotlib Figure.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    steps = np.asarray(curves.steps)
    probs = curves.probabilities
    for j in shown_classes(curves, max_classes):
        prompted = j == curves.prompted_class
        ax.plot(steps, probs[:, j], marker="o", markersize=3, linewidth=2.6 if prompted else 1.2,
                label=curves.classes[j] + (" (prompted)" if prompted else ""), zorder=3 if prompted else 2)
    if curves.first_correct_step is not None:
        ax.axvline(curves.first_correct_step, color="0.3", linestyle="--", linewidth=1)
        # At the top of the line, inside the axes and on a backing: at the bottom it sat on the
        # x-axis label and on the low curves. It turns left of the line past the middle.
        left = len(steps) > 1 and curves.first_correct_step > (steps[0] + steps[-1]) / 2
        ax.annotate(f"top-1 from step {curves.first_correct_step}", (curves.first_correct_step, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(-4 if left else 4, -4), textcoords="offset points",
                    ha="right" if left else "left", va="top", fontsize=8, color="0.3",
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    ax.set(xlabel="denoising step", ylabel="confidence", ylim=(0, 1.05), title=f'"{curves.prompt}"')
    if len(steps):
        ax.set_xticks(steps)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def _load_json(value: Mapping | str | Path | None) -> Mapping | None:
    if value is None or isinstance(value, Mapping):
        return value
    path = Path(value)
    return json.loads(path.read_text()) if path.is_file() else None


def plot_timelines(classify_json: Mapping | str | Path, metrics_json: Mapping | str | Path | None = None) -> Figure:
    """Two timelines on one step axis: when the classifier names the object, when probes read the scene.

    Top: the classifier's top-1 accuracy and mean prompted-class confidence per step, its accuracy
    on real images (dotted line), and each task's best-site probe score per step from a probes
    ``metrics.json`` (``tasks[task]["best_per_step"]``, labelled with ``tasks[task]["metric"]``).
    A missing file, or a task without those keys, just leaves the probe curves out. Bottom: the
    histogram of first-correct steps. Both arguments are dicts or paths. Returns a Figure.
    """
    from matplotlib.figure import Figure

    data = _load_json(classify_json)
    if data is None:
        raise FileNotFoundError(f"no classification results at {classify_json}")
    metrics = _load_json(metrics_json) or {}
    fig = Figure(figsize=(9.6, 5.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    per_step = data["per_step"]
    steps = np.asarray(per_step["step"])
    name = data.get("classifier", "classifier")
    top.plot(steps, per_step["top1_accuracy"], marker="o", linewidth=2.4, color="C3", label=f"{name}: top-1 accuracy")
    top.plot(steps, per_step["mean_confidence"], marker=".", linestyle="--", color="C3", alpha=0.7,
             label=f"{name}: prompted-class confidence")
    ref = data.get("reference") or {}
    if ref.get("top1_accuracy") is not None:
        top.axhline(ref["top1_accuracy"], color="C3", linestyle=":", linewidth=1.2,
                    label=f"{name} on {ref.get('source', 'real images')}")
    tasks = metrics.get("tasks") if isinstance(metrics, Mapping) else None
    for i, (task, entry) in enumerate(sorted((tasks or {}).items())):
        scores = entry.get("best_per_step") if isinstance(entry, Mapping) else None
        if not scores:
            continue
        metric = entry.get("metric", "score")
        top.plot(np.arange(len(scores)), [np.nan if s is None else s for s in scores], marker="s", markersize=3,
                 color=f"C{i % 3}", label=f"probe {task} ({metric}, best site)")
        residual = entry.get("residual_best_per_step")  # depth after removing the layout prior
        if residual:
            top.plot(np.arange(len(residual)), [np.nan if s is None else s for s in residual], marker="s",
                     markersize=3, linestyle="--", color=f"C{i % 3}", label=f"probe {task}, residual ({metric})")
    top.set(ylabel="accuracy / score", ylim=(0, 1.05), title=f"{data.get('model', '')}: when is the object recognised?")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fc = data["first_correct"]
    bottom.bar(steps, fc["histogram"], color="C3", alpha=0.7)
    bottom.set(xlabel="denoising step", ylabel="runs", title=f"first step from which the prompted class stays top-1 "
               f"(never: {fc['never']} of {data['n']})")
    bottom.title.set_fontsize(9)
    bottom.set_xticks(steps)
    bottom.grid(alpha=0.3, axis="y")
    return fig


# --- a probe run's emergence, heat maps and readout strips ----------------------------------------
# Figures are built without pyplot (no global backend or figure registry is touched; works headless);
# :func:`save_figure` writes a PNG with the Agg renderer.

_BASELINE_STYLE = {
    "labeler_on_x0": ("labeler on x0 preview", "tab:orange", "--"),
    "latent_probe": ("latent probe", "tab:green", "-."),
    "permuted_unet": ("permuted UNet", "tab:red", ":"),
    "prior": ("layout prior", "tab:gray", (0, (1, 3))),
}


from .sites import short_site_name as _short  # noqa: E402  (one spelling of site names)


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
    from matplotlib.figure import Figure

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
    from matplotlib.figure import Figure

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
    from matplotlib.figure import Figure

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

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


def atlas_figure(r: Mapping[str, Any], labels: Sequence[str], names: Sequence[str]) -> Figure:
    """The decodability-versus-causality atlas (``ldm_scene.toy.atlas``): three heat maps, sites
    (``labels``) x step windows (``names``): probe Dice, distance closed by the edit, and its control."""
    from matplotlib.figure import Figure

    maps = [np.asarray(r["decodability_dice"]), np.asarray(r["closed_share"]), np.asarray(r["closed_share_control"])]
    titles = ["probe Dice (decodability)", "distance closed by steer\n(causality)", "random-direction control"]
    lim = max(0.05, float(np.nanmax(np.abs(maps[1:]))))
    fig = Figure(figsize=(11, 0.32 * len(labels) + 1.6), layout="constrained")
    for i, (ax, m, title) in enumerate(zip(fig.subplots(1, 3), maps, titles)):
        im = ax.imshow(m, cmap="viridis" if i == 0 else "RdBu_r", aspect="auto",
                       vmin=None if i == 0 else -lim, vmax=None if i == 0 else lim)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_yticks(range(len(labels)), labels if i == 0 else [], fontsize=8)
        ax.set_title(title, fontsize=9)
        for (y, x), v in np.ndenumerate(m):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="white" if i == 0 else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig
