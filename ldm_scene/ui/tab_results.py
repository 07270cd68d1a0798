"""Results tab: the loaded probe set's shipped evaluation (tables, emergence curves, heat maps)."""
from __future__ import annotations

import gradio as gr

from .service import Service


def create(service: Service) -> None:
    """Static content read once at start-up from the probe folder (metrics.json, README.md, figures)."""
    results = service.results()
    gr.Markdown(results.markdown, elem_id="results-text")
    if results.figures:
        gr.Gallery(
            value=[(image, caption) for image, caption in results.figures], label="Figures", columns=2,
            format="png", object_fit="contain", elem_id="results-figures", height="auto",
        )
