"""Intervene tab: move the generated object by editing activations, towards a shifted or drawn mask."""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from . import fields
from .prefetch import prefetched
from .runs import RunLedger
from .inputs import ServiceError
from .service import Service
from .targets import MAX_SHIFT_FRACTION
from .views import Run

SHIFT, DRAW = "shift its mask", "draw a new mask"
_METHOD_INFO = {
    "latent-move": "mid-run, carry the object's part of the latent from its mask to the target (scaled to a drawn "
                   "target's size); denoising redraws the rest, and, with a labeler (the toy model ships one), 4 "
                   "steps later the object found again on the step's prediction is moved the rest of the way "
                   "(strength scales the distance)",
    "readout-guidance": "early on, guide the latent so the foreground probe reads the target mask",
    "steer": "move activations along the probe's foreground direction",
    "probe-gradient": "the paper's method: optimise activations until the foreground probe reports the target",
    "random-move": "latent-move by the same distance in a random direction (the control)",
    "random-guidance": "readout-guidance's push along random directions of the same size (the control)",
    "random-control": "steer's edit along random directions of the same size (the control)",
}
#: What the result panels say while a new run goes or after one was stopped.
_STALE = {
    "running": "A new run is going: the intervention waits for its image.",
    "stopped": "The last run was stopped before it had an image: generate a full run to move its object.",
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
    progress: gr.State


def create(service: Service) -> InterveneTab:
    size = service.display_size
    h, w = service.model.image_size if service.model is not None else (64, 64)
    try:
        methods = list(service.methods)
    except ImportError:
        methods = []
    gr.Markdown(
        "Take the last generated image, say where its object should be, and denoise the same prompt and seed "
        "again while the chosen method edits the run (the default, latent-move, carries the object's part of the "
        "latent to the target mid-run; the others edit the UNet's activations). The result's foreground is "
        "compared with the target (IoU)."
    )
    with gr.Row():
        original = gr.Image(label="Generated image and its foreground (outline)", type="pil", format="png",
                            interactive=False, elem_id="iv-original", height=min(size, 300))
        target = gr.Image(label="Target", type="pil", format="png", interactive=False, elem_id="iv-target",
                          height=min(size, 300))
        live = gr.Image(label="Edited denoising (live)", type="pil", format="png", interactive=False,
                        elem_id="iv-live", height=min(size, 300))
    with gr.Row():
        with gr.Column(scale=2, min_width=280):
            mode = gr.Radio([SHIFT, DRAW], value=SHIFT, label="Target", elem_id="iv-mode")
            dx = fields.slider("dx", whole=True, minimum=-int(w * MAX_SHIFT_FRACTION), maximum=int(w * MAX_SHIFT_FRACTION),
                               value=w // 4, step=1, label=f"dx: pixels to the right (of {w})", elem_id="iv-dx")
            dy = fields.slider("dy", whole=True, minimum=-int(h * MAX_SHIFT_FRACTION), maximum=int(h * MAX_SHIFT_FRACTION),
                               value=0, step=1, label=f"dy: pixels down (of {h})", elem_id="iv-dy")
            method = gr.Dropdown(methods, value=methods[0] if methods else None, label="Method", elem_id="iv-method",
                                 info=_METHOD_INFO.get(methods[0], "") if methods else "intervention is unavailable")
            strength = fields.slider("strength", minimum=0, maximum=3, value=1.0, step=0.25, label="Strength",
                                     elem_id="iv-strength")
            note = gr.Markdown("", label="Target note", elem_id="iv-target-note")
            with gr.Row():
                button = gr.Button("Intervene", variant="primary", elem_id="intervene-btn",
                                   interactive=service.ready and bool(methods))
                stop = gr.Button("Stop", variant="stop", elem_id="iv-stop-btn", interactive=False)
        with gr.Column(scale=3):
            editor = fields.MaskEditor(
                label="Target mask drawing", type="numpy", image_mode="RGBA",
                sources=[], layers=False, transforms=[], canvas_size=(size, size), fixed_canvas=True,
                brush=gr.Brush(colors=["#00dcff"], color_mode="fixed", default_size=max(size // 14, 4)),
                # The frame fits the picture (toolbar above, tools on the left), so nearly every
                # stroke lands on it; strokes beyond the picture are cut off and the note says so.
                eraser=gr.Eraser(default_size=max(size // 14, 4)), elem_id="mask-editor", height=size + 110,
                width=size + 110,
                placeholder="Generate an image first, choose 'draw a new mask', then draw (white = where the object goes)",
            )
    # Whole pictures side by side: "contain" keeps each image uncropped; one row, its own height.
    gallery = gr.Gallery(label="Original · target · result", columns=3, rows=1, height="auto", elem_id="iv-gallery",
                         format="png", object_fit="contain", preview=False, allow_preview=True)
    summary = gr.Markdown("", label="Intervention summary", elem_id="iv-summary")
    with gr.Accordion("Numbers", open=False):
        numbers = gr.JSON(label="Comparison", elem_id="iv-numbers")
    progress = gr.State(None)
    return InterveneTab(original, target, live, mode, dx, dy, editor, method, strength, button, stop,
                        gallery, summary, numbers, note, progress)


def finished_values(service: Service, run: Run | None, finished: bool) -> list[Any]:
    """Values for [original, editor] when a generation ends: the new image to move."""
    if not finished or run is None or run.image is None:
        return [gr.skip(), gr.skip()]
    shown = service.outline(run.image, run.foreground)
    editor = {"background": service.display(run.image), "layers": [], "composite": None}
    return [shown, editor]


def stale_outputs(tab: InterveneTab) -> list[Any]:
    """The panels that show the previous run's intervention (cleared when a new run starts)."""
    return [tab.original, tab.target, tab.live, tab.gallery, tab.summary, tab.numbers, tab.editor]


def stale_values(why: str) -> list[Any]:
    """Clear the previous run's pictures and say why (``why``: ``running`` or ``stopped``)."""
    if why == "running":
        return [None, None, None, None, _STALE[why], None, None]
    return [gr.skip(), gr.skip(), gr.skip(), gr.skip(), _STALE.get(why, ""), gr.skip(), gr.skip()]


def target_values(service: Service, run: Run | None, mode: str, dx: Any, dy: Any) -> list[Any]:
    """[target, note] for a finished run in shift mode: the Target pane shows the default shift at once."""
    if mode != SHIFT or run is None or not run.complete:
        return [gr.skip(), gr.skip()]
    try:
        mask = service.shift_target(run, dx, dy)
    except ValueError as err:
        return [None, f"*{err}*"]
    return [service.mask_picture(mask, run.image), ""]


def drawn_note(mask: np.ndarray) -> str:
    """What a drawn target covers, and whether strokes may have gone past the picture (they are cut off)."""
    text = f"The drawn target covers {mask.mean():.0%} of the picture."
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        text += (" Your strokes reach the picture's edge: anything drawn beyond the picture is not part of the "
                 "target.")
    return f"*{text}*"


def _layers(editor: Any) -> list[Any]:
    if not isinstance(editor, dict):
        return []
    return [layer for layer in editor.get("layers") or [] if layer is not None]


def _target(service: Service, run: Run | None, mode: str, dx: Any, dy: Any, editor: Any) -> np.ndarray:
    if mode == DRAW:
        if run is None or not run.complete:
            service.require_complete(run)
        return service.drawn_target(_layers(editor))
    return service.shift_target(run, dx, dy)


def _require_run(run: Run | None, ledger: RunLedger, request: gr.Request | None) -> None:
    if run is None and (why := ledger.missing(getattr(request, "session_hash", None))):
        raise ServiceError(why)


def wire(service: Service, tab: InterveneTab, run_state: gr.State, ledger: RunLedger) -> Any:
    def preview(run, mode, dx, dy, editor, request: gr.Request = None):
        try:
            _require_run(run, ledger, request)
            mask = _target(service, run, mode, dx, dy, editor)
        except ValueError as err:
            return None, f"*{err}*"
        return service.mask_picture(mask, run.image), drawn_note(mask) if mode == DRAW else ""

    def intervene(run, mode, dx, dy, editor, method, strength, request: gr.Request = None):
        try:
            _require_run(run, ledger, request)
            target = _target(service, run, mode, dx, dy, editor)
            picture = service.mask_picture(target, run.image)
            with closing(prefetched(lambda: service.intervene_stream(run, target, method, strength))) as stream:
                for view in stream:
                    # The live pane shows the edited run's x0 estimate with the probe's outline;
                    # the result (last step) is shown clean.
                    live = view.overlays.get("foreground", view.preview)
                    c = view.comparison
                    done = (view.step + 1, view.num_steps)
                    if c is None:
                        yield live, picture, gr.skip(), f"**Edited run: {view.label}**", gr.skip(), done
                        continue
                    gallery = [
                        (service.outline(c.original, c.original_mask), "original, its foreground outlined"),
                        (service.mask_picture(c.target, c.original), "target (cyan) over the original"),
                        (service.display(c.result), "result"),
                    ]
                    yield service.display(c.result), picture, gallery, c.summary(), c.numbers(), done
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def show_sliders(mode):
        return gr.Slider(visible=mode == SHIFT), gr.Slider(visible=mode == SHIFT)

    def describe(method):
        return gr.Dropdown(info=_METHOD_INFO.get(method, ""))

    target_inputs = [run_state, tab.mode, tab.dx, tab.dy, tab.editor]
    # Every preview decodes the editor's layers (uploads up to MAX_IMAGE_SIDE px): CPU work with a
    # memory cost, so previews queue with the other cheap views, a few at a time, never unbounded.
    preview_queue = dict(api_visibility="private", concurrency_limit=fields.VIEW_CONCURRENCY,
                         concurrency_id=fields.VIEW_QUEUE,
                         show_progress="hidden", trigger_mode="always_last")
    for trigger in (tab.dx.input, tab.dy.input, tab.mode.change):
        trigger(preview, target_inputs, [tab.target, tab.note], **preview_queue)
    # The editor reports strokes as "input" (and "apply" from its save button), not "change".
    for trigger in (tab.editor.input, tab.editor.apply):
        trigger(preview, target_inputs, [tab.target, tab.note], **preview_queue)
    tab.mode.change(show_sliders, [tab.mode], [tab.dx, tab.dy], api_visibility="private", concurrency_limit=None,
                    show_progress="hidden")
    tab.method.change(describe, [tab.method], [tab.method], api_visibility="private", concurrency_limit=None,
                      show_progress="hidden")
    def check(run, mode, dx, dy, editor, request: gr.Request = None):
        # A request that would be refused (no run, a stopped run, a bad target) is refused here,
        # before anything on the page changes (an event with no outputs marks no panel "Error").
        try:
            _require_run(run, ledger, request)
            _target(service, run, mode, dx, dy, editor)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def start():
        # The previous intervention's result goes at once: nothing old sits beside the new run.
        return [gr.Button(interactive=False), gr.Button(interactive=True), None, None, None,
                "*Intervening: waiting for the model…*", None]

    def finish():
        return [gr.Button(interactive=service.ready and bool(service.methods)), gr.Button(interactive=False)]

    def stop(done):
        if done and done[0] >= done[1]:  # it finished before Stop took effect: its result stands
            return [*finish(), gr.skip(), gr.skip(), gr.skip()]
        where = f" at step {done[0]} of {done[1]}" if done else " before the first step finished"
        return [*finish(), f"**Stopped{where}.** The edited run did not finish, so there is no result to compare.",
                None, None]

    control = [tab.button, tab.stop]
    # The check is queued, so a refusal shows as a message; it decodes the drawing, so it waits with
    # the other views (a few at a time), never behind the model.
    checked = tab.button.click(check, target_inputs, None, api_visibility="private", show_progress="hidden",
                               concurrency_limit=fields.VIEW_CONCURRENCY, concurrency_id=fields.VIEW_QUEUE)
    started = checked.success(start, None, [*control, tab.live, tab.gallery, tab.numbers, tab.summary, tab.progress],
                              queue=False, api_visibility="private", show_progress="hidden")
    event = started.success(
        intervene, [*target_inputs, tab.method, tab.strength],
        [tab.live, tab.target, tab.gallery, tab.summary, tab.numbers, tab.progress],
        api_name="intervene", concurrency_limit=1, concurrency_id=fields.MODEL_QUEUE, show_progress="minimal",
        show_progress_on=[tab.live],
    )
    for follow in (event.then, event.failure):  # .then() alone is skipped after an error
        follow(finish, None, control, queue=False, api_visibility="private", show_progress="hidden")
    # Cancel first, then say where it stopped (a step on its way to the page would overwrite the text).
    cancelled = tab.stop.click(None, None, None, cancels=[event], api_visibility="private", queue=False)
    cancelled.then(stop, [tab.progress], [*control, tab.summary, tab.gallery, tab.numbers],
                   api_visibility="private", queue=False, show_progress="hidden")
    return event
