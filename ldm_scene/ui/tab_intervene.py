"""Intervene tab: move the generated object by editing activations, towards a shifted or drawn mask."""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from .service import MAX_SHIFT_FRACTION, Run, Service

SHIFT, DRAW = "shift its mask", "draw a new mask"
_METHOD_INFO = {
    "steer": "move activations along the probe's foreground direction (moves the object in the toy world)",
    "probe-gradient": "the paper's method: optimise activations until the foreground probe reports the target",
    "random-control": "steer's edit along random directions of the same size (should not move anything)",
}


@dataclass
class InterveneTab:
    original: gr.Image
    target: gr.Image
    live: gr.Image
    mode: gr.Radio
    dx: gr.Slider
    dy: gr.Slider
    editor: gr.ImageEditor
    method: gr.Dropdown
    strength: gr.Slider
    button: gr.Button
    stop: gr.Button
    gallery: gr.Gallery
    summary: gr.Markdown
    numbers: gr.JSON
    note: gr.Markdown


def create(service: Service) -> InterveneTab:
    size = service.display_size
    h, w = service.model.image_size if service.model is not None else (64, 64)
    try:
        methods = list(service.methods)
    except ImportError:
        methods = []
    gr.Markdown(
        "Take the last generated image, say where its object should be, and denoise the same prompt and seed "
        "again while the edit rewrites the UNet's activations in the first steps. The result's foreground is "
        "compared with the target (IoU)."
    )
    with gr.Row():
        original = gr.Image(label="Generated image and its foreground", type="pil", format="png",
                            interactive=False, elem_id="iv-original", height=min(size, 300))
        target = gr.Image(label="Target", type="pil", format="png", interactive=False, elem_id="iv-target",
                          height=min(size, 300))
        live = gr.Image(label="Edited denoising (live)", type="pil", format="png", interactive=False,
                        elem_id="iv-live", height=min(size, 300))
    with gr.Row():
        with gr.Column(scale=2, min_width=280):
            mode = gr.Radio([SHIFT, DRAW], value=SHIFT, label="Target", elem_id="iv-mode")
            dx = gr.Slider(-int(w * MAX_SHIFT_FRACTION), int(w * MAX_SHIFT_FRACTION), value=w // 4, step=1,
                           label=f"dx: pixels to the right (of {w})", elem_id="iv-dx")
            dy = gr.Slider(-int(h * MAX_SHIFT_FRACTION), int(h * MAX_SHIFT_FRACTION), value=0, step=1,
                           label=f"dy: pixels down (of {h})", elem_id="iv-dy")
            method = gr.Dropdown(methods, value=methods[0] if methods else None, label="Method", elem_id="iv-method",
                                 info=_METHOD_INFO.get(methods[0], "") if methods else "intervention is unavailable")
            strength = gr.Slider(0, 3, value=1.0, step=0.25, label="Strength", elem_id="iv-strength")
            note = gr.Markdown("", elem_id="iv-target-note")
            with gr.Row():
                button = gr.Button("Intervene", variant="primary", elem_id="intervene-btn",
                                   interactive=service.ready and bool(methods))
                stop = gr.Button("Stop", variant="stop", elem_id="iv-stop-btn")
        with gr.Column(scale=3):
            editor = gr.ImageEditor(
                label="Draw the target mask (choose 'draw a new mask')", type="numpy", image_mode="RGBA",
                sources=[], layers=False, transforms=[], canvas_size=(size, size), fixed_canvas=True,
                brush=gr.Brush(colors=["#ff2020"], color_mode="fixed", default_size=max(size // 14, 4)),
                eraser=gr.Eraser(default_size=max(size // 14, 4)), elem_id="mask-editor", height=size + 120,
                placeholder="Generate an image first",
            )
    gallery = gr.Gallery(label="Original · target · result", columns=3, height=size + 60, elem_id="iv-gallery",
                         format="png", object_fit="contain")
    summary = gr.Markdown("", elem_id="iv-summary")
    with gr.Accordion("Numbers", open=False):
        numbers = gr.JSON(label="Comparison", elem_id="iv-numbers")
    return InterveneTab(original, target, live, mode, dx, dy, editor, method, strength, button, stop,
                        gallery, summary, numbers, note)


def finished_values(service: Service, run: Run | None, finished: bool) -> list[Any]:
    """Values for [original, editor] when a generation ends: the new image to move."""
    if not finished or run is None or run.image is None:
        return [gr.skip(), gr.skip()]
    shown = service.mask_picture(run.foreground, run.image) if run.foreground is not None else service.display(run.image)
    editor = {"background": service.display(run.image), "layers": [], "composite": None}
    return [shown, editor]


def _layers(editor: Any) -> list[Any]:
    if not isinstance(editor, dict):
        return []
    return [layer for layer in editor.get("layers") or [] if layer is not None]


def _target(service: Service, run: Run | None, mode: str, dx: Any, dy: Any, editor: Any) -> np.ndarray:
    if mode == DRAW:
        if run is None or not run.complete:
            from .service import ServiceError

            raise ServiceError("generate an image first (Generate tab), then draw where its object should go")
        return service.drawn_target(_layers(editor))
    return service.shift_target(run, dx, dy)


def wire(service: Service, tab: InterveneTab, run_state: gr.State) -> Any:
    def preview(run, mode, dx, dy, editor):
        try:
            mask = _target(service, run, mode, dx, dy, editor)
        except ValueError as err:
            return None, f"*{err}*"
        return service.mask_picture(mask, run.image), ""

    def intervene(run, mode, dx, dy, editor, method, strength):
        try:
            target = _target(service, run, mode, dx, dy, editor)
            picture = service.mask_picture(target, run.image)
            with closing(service.intervene_stream(run, target, method, strength)) as stream:
                for view in stream:
                    live = view.overlays.get("foreground", view.preview)
                    c = view.comparison
                    if c is None:
                        yield live, picture, gr.skip(), f"**{view.label}**", gr.skip()
                        continue
                    gallery = [
                        (service.mask_picture(c.original_mask, c.original), "original and its foreground"),
                        (service.mask_picture(c.target, c.original), "target"),
                        (service.mask_picture(c.result_mask, c.result), "result and its foreground"),
                    ]
                    yield service.display(c.result), picture, gallery, c.summary(), c.numbers()
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def show_sliders(mode):
        return gr.Slider(visible=mode == SHIFT), gr.Slider(visible=mode == SHIFT)

    def describe(method):
        return gr.Dropdown(info=_METHOD_INFO.get(method, ""))

    target_inputs = [run_state, tab.mode, tab.dx, tab.dy, tab.editor]
    for trigger in (tab.dx.release, tab.dy.release, tab.mode.change):
        trigger(preview, target_inputs, [tab.target, tab.note], api_visibility="private",
                concurrency_limit=None, show_progress="hidden", trigger_mode="always_last")
    # The editor reports strokes as "input" (and "apply" from its save button), not "change".
    for trigger in (tab.editor.input, tab.editor.apply):
        trigger(preview, target_inputs, [tab.target, tab.note], api_visibility="private",
                concurrency_limit=None, show_progress="hidden", trigger_mode="always_last")
    tab.mode.change(show_sliders, [tab.mode], [tab.dx, tab.dy], api_visibility="private", concurrency_limit=None,
                    show_progress="hidden")
    tab.method.change(describe, [tab.method], [tab.method], api_visibility="private", concurrency_limit=None,
                      show_progress="hidden")
    event = tab.button.click(
        intervene, [*target_inputs, tab.method, tab.strength], [tab.live, tab.target, tab.gallery, tab.summary, tab.numbers],
        api_name="intervene", concurrency_limit=1, concurrency_id="model", show_progress="minimal",
        show_progress_on=[tab.live],
    )
    tab.stop.click(None, None, None, cancels=[event], api_visibility="private")
    return event
