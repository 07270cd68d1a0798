"""Per-run plots, as data for Gradio's line plots (drawn in the browser by Vega-Lite).

A run redraws them while it streams: a matplotlib figure cost ~0.2 s of server time to draw and
encode each time, more than a toy-model step (benchmarks/bench_app.py); a line plot sends its
points. Steps count from 1, as the page does (the run stores them from 0).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .views import Run

_COLOURS = {"foreground": "#d62728", "depth": "#7b3294", "shading": "#555555"}
#: The shipped test-split means, drawn paler beside each task's own curve.
_PALE = {"foreground": "#f4a6a6", "depth": "#c7a6d9", "shading": "#b8b8b8"}


def emergence_frame(run: Run | None, shipped: Mapping[str, tuple[str, Sequence[float]]] | None = None) -> Any:
    """Per-step agreement of each probe's readout with the finished image's labels (one image), as a
    ``gr.LinePlot`` update (None without scores).

    ``shipped`` adds the probe set's test-split curves (``{task: (metric, per-step scores)}``), so
    this image can be compared with the average.
    """
    import gradio as gr
    import pandas as pd

    if run is None or not run.emergence:
        return None
    rows: list[dict[str, Any]] = []
    colours: dict[str, str] = {}
    for task, scores in run.emergence.items():
        series = task  # the metric is named on the y axis: short names keep the legend on one line
        colours[series] = _COLOURS.get(task, "#1f77b4")
        rows += [{"step": s + 1, "agreement": float(v), "series": series} for s, v in enumerate(scores)
                 if not math.isnan(v)]
    for task, (_metric, scores) in (shipped or {}).items():
        if task not in run.emergence:
            continue
        series = f"{task}: test mean"
        colours[series] = _PALE.get(task, "#aec7e8")
        rows += [{"step": s + 1, "agreement": float(v), "series": series} for s, v in enumerate(scores)
                 if not math.isnan(v) and s < run.num_steps]
    lowest = min((r["agreement"] for r in rows), default=0.0)
    return gr.LinePlot(pd.DataFrame(rows, columns=["step", "agreement", "series"]),
                       title=f"Probe emergence for this image (vs {run.reference_source})",
                       color_map=colours, x_lim=[1, max(run.num_steps, 2)],
                       y_lim=[min(-0.05, lowest - 0.05), 1.05])


def classifier_frame(curves: Any) -> Any:
    """The classifier's per-step confidence for the classes worth showing (:func:`~ldm_scene.figures.shown_classes`),
    as a ``gr.LinePlot`` update; its title names the first step whose top class is the prompt's."""
    import gradio as gr
    import pandas as pd

    from ..figures import shown_classes

    if curves is None:
        return None
    rows = [{"step": int(step) + 1, "confidence": float(curves.probabilities[i, j]),
             "class": curves.classes[j] + (" (prompted)" if j == curves.prompted_class else "")}
            for j in shown_classes(curves) for i, step in enumerate(curves.steps)]
    first = curves.first_correct_step
    named = f"top-1 from step {first + 1}" if first is not None else "not the prompted class yet"
    steps = [int(s) + 1 for s in curves.steps]
    return gr.LinePlot(pd.DataFrame(rows, columns=["step", "confidence", "class"]),
                       title=f'Classifier on "{curves.prompt}": {named}',
                       x_lim=[1, max(steps[-1], 2)] if steps else None)
