"""Classifier tab: when does a classifier recognise the object, and when do the probes see it?

The classifier's per-step confidence curves are drawn live by the Generate run (this tab's plots
are among its outputs); the probe emergence for that image appears when the run ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from . import fields
from .plots import classifier_frame, emergence_frame
from .runs import RunLedger
from .inputs import ServiceError
from .service import Service
from .views import Run


@dataclass
class ClassifierTab:
    curves: gr.LinePlot
    emergence: gr.LinePlot
    summary: gr.Markdown
    button: gr.Button


def create(service: Service) -> ClassifierTab:
    if service.classifier is None:
        gr.Markdown(
            "No classifier is loaded for this model, so only the probes' emergence is shown. "
            "See the notes at the top of the page."
        )
    else:
        gr.Markdown(
            "The classifier reads each step's denoised estimate (as the paper ran VGG-16 on SD's); the plot's "
            "title names the first step at which its top class is the prompt's. While a run streams it reads "
            "the steps whose estimate is decoded (see *Decode the x0 image every k steps*); **Recompute** "
            "decodes and reads every step. Beside it: the same run's probes, scored against the finished image "
            "(foreground by Dice, depth and shading by Spearman; paler: the probe set's test-split mean)."
        )
    with gr.Row():
        # Drawn in the browser (Vega-Lite): redrawing them live costs the server next to nothing.
        curves = gr.LinePlot(x="step", y="confidence", color="class", label="Classifier confidence per step",
                             title="Classifier confidence per step", x_title="denoising step",
                             y_title="confidence", y_lim=[0, 1], elem_id="classifier-curves")
        emergence = gr.LinePlot(x="step", y="agreement", color="series", label="Probe emergence for this image",
                                title="Probe emergence for this image", x_title="denoising step",
                                y_title="agreement (Dice / Spearman)", elem_id="emergence")
    summary = gr.Markdown("Generate an image first (Generate tab).", label="Classifier summary",
                          elem_id="classifier-summary")
    button = gr.Button("Recompute the curves for the last run", interactive=service.classifier is not None)
    return ClassifierTab(curves, emergence, summary, button)


def curves_figure(service: Service, curves: Any) -> Any:
    """The classifier's curves as a line plot update (None without a classifier or curves)."""
    return None if service.classifier is None else classifier_frame(curves)


def describe(run: Run | None) -> str:
    """A line or two about the run: where the emergence comes from, and the classifier's verdict."""
    if run is None:
        return "Generate an image first (Generate tab)."
    lines = [f"Prompt: *{run.config.prompt}* (seed {run.config.seed}, {run.num_steps} steps)."]
    if run.emergence:
        lines.append(f"Probe emergence is measured against {run.reference_source}.")
    curves = run.curves
    if curves is not None and curves.steps:
        name, confidence = curves.top_k[-1][0]
        verdict = f"At the last step the classifier says **{name}** ({confidence:.0%})."
        if curves.prompted_class is None:
            verdict += " The prompt names none of its classes, so no step counts as correct."
        elif curves.first_correct_step is None:
            verdict += f" It never settles on the prompted **{curves.classes[curves.prompted_class]}**."
        else:
            verdict += (f" The prompted **{curves.classes[curves.prompted_class]}** is its top class from step "
                        f"**{curves.first_correct_step + 1}** on.")
        lines.append(verdict)
        if len(curves.steps) < run.num_steps:
            lines.append(f"The classifier read the {len(curves.steps)} decoded steps of {run.num_steps} "
                         "(*Recompute* reads every step).")
    return "\n\n".join(lines)


def live_values(service: Service, run: Run | None, finished: bool) -> list[Any]:
    """Values for [curves, emergence, summary] while a run streams: the curves whenever the
    classifier read this step (a decoded step), the rest at the end."""
    fresh = run is not None and run.curves is not None and bool(run.curves.steps) and (
        finished or run.curves.steps[-1] == run.num_steps - 1)
    curves = curves_figure(service, run.curves) if fresh else gr.skip()
    if not finished:
        return [curves, gr.skip(), gr.skip()]
    return [curves, emergence_frame(run, service.shipped_emergence(run)), describe(run)]


def stale_outputs(tab: ClassifierTab) -> list[Any]:
    """The panels that show the previous run's curves."""
    return [tab.curves, tab.emergence, tab.summary]


def stale_values(why: str) -> list[Any]:
    """Clear the previous run's curves when a run starts; say what a stopped run's curves cover."""
    if why == "running":
        return [None, None, "A new run is going: its classifier curve is drawn as it runs; the probe emergence "
                            "appears when it finishes."]
    return [gr.skip(), None, "The run was stopped: the classifier curve covers the steps that finished, and "
                             "without a final image there is nothing to score the probes' emergence against."]


def wire(service: Service, tab: ClassifierTab, run_state: gr.State, ledger: RunLedger) -> None:
    def recompute(run, request: gr.Request = None):
        try:
            if run is None and (why := ledger.missing(getattr(request, "session_hash", None))):
                raise ServiceError(why)
            run.curves = service.classify(run)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return curves_figure(service, run.curves), emergence_frame(run, service.shipped_emergence(run)), describe(run), run

    tab.button.click(recompute, [run_state], [tab.curves, tab.emergence, tab.summary, run_state], api_name="classify",
                     concurrency_limit=1, concurrency_id=fields.MODEL_QUEUE)
