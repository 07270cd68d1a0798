"""Results tab: the loaded probe set's shipped evaluation (tables, emergence curves, heat maps).

Figures sit where the text cites them and links point at their place on the page
(:mod:`.results`); the app serves no files for them.
"""
from __future__ import annotations

import gradio as gr

from .service import Service

#: Tables scroll sideways instead of breaking words ("metri c"); figures keep a readable width.
CSS = """
#results-text [data-testid='markdown'] { overflow-x: auto; }
#results-text th, #results-text td { white-space: nowrap; }
#results-text img { max-width: min(100%, 1000px); height: auto; }
"""


def create(service: Service) -> None:
    """Static content read once at start-up from the probe folder (metrics.json, README.md, figures)."""
    gr.Markdown(service.results().markdown, elem_id="results-text")
