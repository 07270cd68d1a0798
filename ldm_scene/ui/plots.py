"""Figures the app draws per run (matplotlib ``Figure`` objects, no pyplot state)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .views import Run

_METRIC = {"foreground": "Dice", "depth": "Spearman", "shading": "Spearman"}
_COLOURS = {"foreground": "#d62728", "depth": "#7b3294", "shading": "#555555"}


def emergence_figure(run: Run, shipped: Mapping[str, tuple[str, Sequence[float]]] | None = None) -> Figure | None:
    """Per-step agreement of each probe's readout with the finished image's labels (one image).

    ``shipped`` adds the probe set's test-split curves (``{task: (metric, per-step scores)}``) as
    dashed lines, for comparing this image with the average.
    """
    if run is None or not run.emergence:
        return None
    fig = Figure(figsize=(5.2, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    # Steps are drawn from 1, as the page counts them (the run stores them from 0).
    for task, scores in run.emergence.items():
        steps = [s + 1 for s, v in enumerate(scores) if not math.isnan(v)]
        values = [v for v in scores if not math.isnan(v)]
        ax.plot(steps, values, marker="o", ms=3, color=_COLOURS.get(task), label=f"{task} ({_METRIC.get(task, '')})")
    for task, (metric, scores) in (shipped or {}).items():
        if task not in run.emergence:
            continue
        steps = [s + 1 for s, v in enumerate(scores) if not math.isnan(v)]
        values = [v for v in scores if not math.isnan(v)]
        ax.plot(steps, values, linestyle="--", linewidth=1, color=_COLOURS.get(task), alpha=0.6,
                label=f"{task}, test-split mean ({metric})")
    ax.set_xlabel("denoising step (1 = first)")
    ax.set_ylabel("agreement")
    lowest = min((v for c in run.emergence.values() for v in c if not math.isnan(v)), default=0.0)
    ax.set_ylim(min(-0.05, lowest - 0.05), 1.05)
    ax.set_xlim(0.5, max(run.num_steps, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    # Below the axes, never over the curves.
    fig.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    ax.set_title(f"Probe emergence for this image\n(vs {run.reference_source})", fontsize=9)
    return fig


def count_steps_from_one(fig: Figure | None) -> Figure | None:
    """Relabel a per-step figure drawn at 0-based steps (the library's) so its steps read from 1.

    Tick labels and "step N" annotations move up by one; the data stay where they are.
    """
    import re

    if fig is None:
        return None
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if float(t).is_integer()]
        if ticks:
            ax.set_xticks(ticks, [str(int(t) + 1) for t in ticks])
        for text in ax.texts:
            text.set_text(re.sub(r"step (\d+)", lambda m: f"step {int(m[1]) + 1}", text.get_text()))
        if ax.get_xlabel():
            ax.set_xlabel(f"{ax.get_xlabel()} (1 = first)")
    return fig
