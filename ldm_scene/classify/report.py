"""The classifier report: ``classify.json``, its figures and ``README.md``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ..figures import plot_run_curves, plot_timelines
from ..reports import markdown_table
from ..sampler import describe_guidance
from .curves import RunCurves

# --------------------------------------------------------------------------------------------
# Figures and the report
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def readme_from_json(data: Mapping, figures: Sequence[str] = ()) -> str:
    """The Markdown report of an :func:`evaluate` result: summary, per-step table, figure links."""
    per_step, fc, ref = data["per_step"], data["first_correct"], data.get("reference")
    lines = [
        f"# Classification curves: {data['model']}",
        "",
        f"Classifier `{data['classifier']}` ({data['num_classes']} classes) on each step's x0 preview, "
        f"{data['n']} runs, {data['steps']} steps, "
        + describe_guidance(data["guidance"], data.get("late_guidance"), data.get("late_from"))
        + (f"; {len(data['skipped'])} prompts naming no class skipped." if data.get("skipped") else "."),
        "",
        f"- Top-1 accuracy at the last step: {_fmt(per_step['top1_accuracy'][-1])}",
        f"- Median first-correct step (runs that end correct): {_fmt(fc['median'], 1)}; "
        f"never correct at the end: {fc['never']} of {data['n']}",
    ]
    if ref:
        lines.append(f"- Reference, the same classifier on {ref['source']} (n={ref['n']}): "
                     f"top-1 accuracy {_fmt(ref['top1_accuracy'])}, mean confidence {_fmt(ref['mean_confidence'])}")
    rows = [(s, _fmt(c), _fmt(a1), _fmt(ak), h) for s, c, a1, ak, h in zip(
        per_step["step"], per_step["mean_confidence"], per_step["top1_accuracy"], per_step["topk_accuracy"], fc["histogram"])]
    rows.append(("never", "", "", "", fc["never"]))
    lines += [""] + markdown_table(("step", "mean prompted-class confidence", "top-1 accuracy", f"top-{data['top_k']} accuracy",
                                    "runs first correct here"), rows, align="---:")
    if figures:
        lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    lines += ["", "Written by `python -m ldm_scene.classify` from `classify.json`; steps are 0-based."]
    return "\n".join(lines) + "\n"


def write_report(
    data: Mapping, out: str | Path, examples: Sequence[tuple[int, RunCurves]] = (),
    metrics_json: Mapping | str | Path | None = None,
) -> list[Path]:
    """Write ``classify.json``, the figures and ``README.md`` (rendered from the json) into ``out``."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "classify.json").write_text(json.dumps(data, indent=1) + "\n")
    figures = ["figures/timelines.png"]
    plot_timelines(data, metrics_json).savefig(out / figures[0], dpi=120)
    for i, curves in examples:
        name = f"figures/run{i:03d}.png"
        plot_run_curves(curves).savefig(out / name, dpi=110)
        figures.append(name)
    (out / "README.md").write_text(readme_from_json(data, figures))
    return [out / "classify.json", out / "README.md", *(out / f for f in figures)]
