"""The Gradio Blocks: a status line, four tabs over one :class:`~.service.Service`, one model queue.

Per-session data (the last run) lives only in ``gr.State``; the service holds nothing a request
can change (a :class:`~.runs.RunLedger` only remembers which sessions had a run, to explain one
that Gradio dropped). Every event that runs the model shares one queue
(``concurrency_id="model"``, one job at a time); views of a stored run (scrubbing, target previews,
which decode uploaded drawings) share another, a few at a time.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from . import tab_classifier, tab_generate, tab_intervene, tab_results
from .runs import RunLedger
from .service import Service

#: Jobs waiting for the model beyond this are refused with "queue is full" instead of piling up.
QUEUE_MAX_SIZE = 32
#: A session's last run is dropped this long after it was stored (it holds every step's preview).
STATE_TTL_S = 3600
#: Gradio keeps the state of this many sessions and evicts the oldest beyond it.
STATE_SESSION_CAPACITY = 200

INTRO = """\
# ldm-scene: watch a diffusion model build a scene

Linear probes read the **foreground**, **depth** and **shading** of the scene out of the UNet's
self-attention activations while it denoises: here they run live at every step. Compare them with a
classifier looking at the same steps, and move the object by editing the activations the probes read.
"""

CSS = """
#status { font-size: 0.9em; }
#gen-progress { min-height: 2.5em; }
""" + tab_results.CSS


def build_demo(service: Service) -> gr.Blocks:
    """The app for ``service``; call :func:`launch_options` for how to serve it safely."""
    with gr.Blocks(title="ldm-scene", delete_cache=(900, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(service.status_markdown(), elem_id="status")
        run_state = gr.State(None, time_to_live=STATE_TTL_S)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate = tab_generate.create(service)
            with gr.Tab("Classifier", id="classifier", elem_id="tab-classifier"):
                classifier = tab_classifier.create(service)
            with gr.Tab("Intervene", id="intervene", elem_id="tab-intervene"):
                intervene = tab_intervene.create(service)
            with gr.Tab("Results", id="results", elem_id="tab-results"):
                tab_results.create(service)

        ledger = RunLedger(lambda: getattr(demo, "state_session_capacity", None), STATE_TTL_S)

        def after_values(run, finished):
            return [*tab_classifier.live_values(service, run, finished),
                    *tab_intervene.finished_values(service, run, finished)]

        def stale_values(why):
            return [*tab_classifier.stale_values(why), *tab_intervene.stale_values(why)]

        def finish_values(run, mode, dx, dy):
            # After the run (or after a request refused before any model work, when the state
            # still holds the previous run): the Intervene tab shows that run and its default target.
            ready = run is not None and run.complete
            return [*tab_intervene.finished_values(service, run, True),
                    *tab_intervene.target_values(service, run, mode, dx, dy), "" if ready else gr.skip()]

        after_outputs = [classifier.curves, classifier.emergence, classifier.summary,
                         intervene.original, intervene.editor]
        stale_outputs = [*tab_classifier.stale_outputs(classifier), *tab_intervene.stale_outputs(intervene)]
        tab_generate.wire(service, generate, run_state, ledger, after_outputs, after_values, stale_outputs, stale_values,
                          finish_outputs=[intervene.original, intervene.editor, intervene.target, intervene.note,
                                          intervene.summary],
                          finish_inputs=[intervene.mode, intervene.dx, intervene.dy], finish_values=finish_values)
        tab_classifier.wire(service, classifier, run_state, ledger)
        tab_intervene.wire(service, intervene, run_state, ledger)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return demo


def launch_options() -> dict[str, Any]:
    """``launch()`` keywords that keep the app from serving anything but its own outputs.

    No extra allowed paths (Gradio then serves only files it created or received); no MCP
    server, monitoring endpoint, SSR or share link; uploads capped; errors raised as ``gr.Error``
    reach the page, other exceptions show only a generic message.
    """
    return dict(
        allowed_paths=[],
        show_error=False,
        max_file_size="10mb",
        mcp_server=False,
        enable_monitoring=False,
        ssr_mode=False,
        share=False,
        state_session_capacity=STATE_SESSION_CAPACITY,
        css=CSS,
        footer_links=["api"],
    )
