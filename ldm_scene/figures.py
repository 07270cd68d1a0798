"""The research figures ldm-scene writes next to its results (matplotlib, no pyplot state).

- :func:`controls_figure`: a probe run's curves beside what could explain them away (``controls.png``);
- :func:`plot_run_curves`: one run's classifier confidence per step (the classifier report and the app);
- :func:`plot_timelines`: when the classifier names the object vs when probes read the scene.

Each returns a ``matplotlib.figure.Figure`` built from JSON results alone; the caller saves it.
matplotlib is imported when a figure is drawn, not with this module.
(The probe run's emergence, heat-map and strip figures are in :mod:`ldm_scene.viz`, beside the
app's display pictures.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .classify.curves import RunCurves

__all__ = ["controls_figure", "plot_run_curves", "plot_timelines"]


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
    chosen: list[int] = []
    if curves.prompted_class is not None:
        chosen.append(curves.prompted_class)
    peaks = probs.max(axis=0) if len(steps) else np.zeros(len(curves.classes))
    for j in list(dict.fromkeys(curves.top1.tolist())) + list(np.argsort(-peaks, kind="stable")):
        if len(chosen) >= max_classes:
            break
        if int(j) not in chosen:
            chosen.append(int(j))
    for j in chosen:
        prompted = j == curves.prompted_class
        ax.plot(steps, probs[:, j], marker="o", markersize=3, linewidth=2.6 if prompted else 1.2,
                label=curves.classes[j] + (" (prompted)" if prompted else ""), zorder=3 if prompted else 2)
    if curves.first_correct_step is not None:
        ax.axvline(curves.first_correct_step, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(f"top-1 from step {curves.first_correct_step}", (curves.first_correct_step, 0.0),
                    xytext=(4, 4), textcoords="offset points", fontsize=8, color="0.3")
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
