"""The controls figure of a probe run: each probe curve beside what could explain it away.

One column per task (and depth's residual): on top the probe's score per step (validation-chosen
site) with its grid ceiling, the prompt-only baseline, the same-prompt control and the labeler on
the decoded x0 preview; below, the probe's margins over those three baselines with their 95%
bootstrap intervals as bands. Built without pyplot (no global state), from ``metrics.json`` alone;
:func:`ldm_scene.viz.save_figure` writes it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["controls_figure"]

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
