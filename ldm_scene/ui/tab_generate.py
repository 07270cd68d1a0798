"""Generate tab: prompt in, every denoising step out (x0 preview and the probes' readouts), live."""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from ..probes import TASKS
from . import fields
from .inputs import InputError, whole_number
from .runs import RunLedger
from .previews import PREVIEW_EVERY
from .service import DEFAULT_ATTENTION_GROUP, MAX_UI_STEPS, Service
from .views import Run, StepView

_TITLES = {
    "foreground": "Foreground probe: outline of p > 0.5",
    "depth": "Depth probe (bright = near)",
    "shading": "Shading probe (bright = lit)",
}
GENERATE, RUNNING = "Generate", "Running…"


@dataclass
class GenerateTab:
    prompt: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    sites: dict[str, gr.Dropdown]
    button: gr.Button
    stop: gr.Button
    progress: gr.Markdown
    preview: gr.Image
    readouts: dict[str, gr.Image]
    heat: gr.Image
    attention_sites: gr.Dropdown
    preview_every: gr.Slider
    attention: gr.Image
    compare: gr.Image
    scrub: gr.Slider
    started: gr.State


def vocabulary_note(service: Service) -> str:
    """The line under the prompt box: the words a word-level model knows (nothing for SD)."""
    words = service.vocabulary()
    if not words:
        return ""
    return (f"This model knows **{len(words)} words**: {', '.join(words)}. A prompt says what the object is "
            "(\"a red cube\"), never where: the noise decides the place.")


def site_note(service: Service) -> str:
    """The line under the site menus: the schedule the probes were fit for, and what the defaults are."""
    text = (f"Probes are fit for {service.probe_steps or '–'}-step runs; at other step counts the preview streams "
            "without readouts. Default: the best site per task in the probe set's metrics")
    if service.group_probe is not None:
        text += (f"; for the foreground, one probe over **{service.group_probe.name}** (one linear map per step over "
                 "their channels together); its scores beside single sites' are on the Results tab")
    return text + "."


def create(service: Service) -> GenerateTab:
    """Lay out the tab's components (events are wired in :func:`wire`)."""
    with gr.Row():
        with gr.Column(scale=2, min_width=280):
            prompt = gr.Textbox(label="Prompt", placeholder="a red cube", max_lines=3, elem_id="prompt")
            gr.Markdown(vocabulary_note(service), elem_id="vocabulary")
            with gr.Row():
                seed = fields.number("seed", whole=True, label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                steps = fields.slider("steps", whole=True, minimum=1, maximum=MAX_UI_STEPS, value=service.default_steps,
                                      step=1, label="Steps", elem_id="steps")
            guidance = fields.slider("guidance", minimum=0, maximum=15, value=service.default_guidance, step=0.5,
                                     label="Guidance scale", info=service.guidance_note(), elem_id="guidance")
            sites = {}
            with gr.Accordion("Where the probes and the attention maps read", open=False):
                for task in TASKS:
                    choices = service.site_choices(task)
                    sites[task] = gr.Dropdown(
                        choices, value=service.default_site(task), label=f"{task} site",
                        interactive=bool(choices), elem_id=f"site-{task}",
                        info=None if choices else "no probe for this task",
                    )
                gr.Markdown(site_note(service))
                attention_sites = gr.Dropdown(
                    service.attention_choices(), value=DEFAULT_ATTENTION_GROUP if service.ready else None,
                    label="Cross-attention sites (per-word maps)", elem_id="attention-sites",
                    info="Each prompt word's share of the cross-attention (attn2) at these sites, averaged over them.",
                )
                preview_every = fields.slider(
                    "preview_every", whole=True, minimum=1, maximum=5, value=PREVIEW_EVERY, step=1,
                    label="Decode the x0 image every k steps", elem_id="preview-every",
                    info="The probes are read at every step; the x0 image (and the classifier and labeler on it) "
                         "at the first step, every k steps and at the last, which keeps the stream fast. Scrubbing "
                         "to a skipped step decodes it. 1 = every step.",
                )
            with gr.Row():
                button = gr.Button(GENERATE, variant="primary", elem_id="generate-btn", interactive=service.ready)
                stop = gr.Button("Stop", variant="stop", elem_id="stop-btn", interactive=False)
            progress = gr.Markdown("", label="Progress", elem_id="gen-progress")
            examples = service.examples()
            if examples:
                gr.Examples(examples, [prompt, seed, steps, guidance], label="Examples", examples_per_page=6)
        with gr.Column(scale=3):
            size = service.display_size
            with gr.Row():
                preview = _image("Denoised estimate (x0) at this step", "preview", size)
                # The readouts change every step: JPEG (viz.FAST_JPEG_QUALITY) encodes them ~15x faster than PNG.
                readouts = {"foreground": _image(_TITLES["foreground"], "readout-foreground", size, "jpeg")}
            with gr.Row():
                for task in ("depth", "shading"):
                    readouts[task] = _image(_TITLES[task], f"readout-{task}", size, "jpeg")
            with gr.Accordion("Foreground probability (heat map)", open=False):
                heat = _image("Foreground probability at this step", "readout-foreground-heat", size, "jpeg")
            gr.Markdown("**Cross-attention per prompt word at this step** (beside the x0 estimate; one colour "
                        "scale for all words)", elem_id="word-attention-title")
            attention = gr.Image(label="Cross-attention per prompt word at this step", show_label=False, type="pil",
                                 format="png", interactive=False, elem_id="word-attention",
                                 buttons=["download", "fullscreen"])
            gr.Markdown("**Probe vs labeler on the x0 estimate vs the final image's label, at this step**",
                        elem_id="compare-title")
            compare = gr.Image(label="Probe vs labeler on the x0 preview vs the final image's label, at this step",
                               show_label=False, type="pil", format="png", interactive=False, elem_id="compare-strip",
                               buttons=["download", "fullscreen"])
            scrub = fields.slider("step", whole=True, minimum=1, maximum=max(service.default_steps, 2), value=1, step=1,
                                  label="Step shown (drag or type, after a run)", interactive=False, elem_id="scrub")
    started = gr.State(None)
    return GenerateTab(prompt, seed, steps, guidance, sites, button, stop, progress, preview, readouts, heat,
                       attention_sites, preview_every, attention, compare, scrub, started)


def _image(label: str, elem_id: str, size: int, fmt: str = "png") -> gr.Image:
    return gr.Image(label=label, type="pil", format=fmt, interactive=False, elem_id=elem_id,
                    height=min(size, 320), buttons=["download", "fullscreen"])


def step_outputs(service: Service, view: StepView, live: bool = False) -> list[Any]:
    """The preview, the three readout pictures and the progress line for one step.

    ``live``: a streamed step whose x0 was not decoded leaves the preview as it is (the latest
    decoded one, which the progress line names) instead of sending the same picture again.
    """
    out = [view.preview if view.decoded or not live else gr.skip()]
    for task in TASKS:
        out.append(view.overlays.get(task))
    bar = "▰" * (view.step + 1) + "▱" * (view.num_steps - view.step - 1)
    text = f"**{view.label}** {bar}"
    if view.run.notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(view.run.notes))
    out.append(text)
    return out


def extra_outputs(view: StepView, live: bool = False) -> list[Any]:
    """The step's foreground heat map, per-word attention strip and compare strip.

    ``live``: the two strips, which set the step's maps beside its x0 estimate, and the heat map
    (folded away by default) are sent at the steps whose estimate was decoded; the others leave
    them as they are (fewer pictures to draw and encode). Scrubbing shows every step's.
    """
    if live and not view.decoded:
        return [gr.skip(), gr.skip(), gr.skip()]
    return [view.foreground_heat, view.attention, view.compare]


def scrub_update(num_steps: int, value: int | None = None) -> Any:
    """The step slider for a run of ``num_steps`` (1-based, as on screen).

    A 1-step run has nothing to scrub, and Gradio refuses a slider whose minimum is its maximum:
    the slider is hidden (the progress line says "step 1 of 1") rather than offering 1-2.
    """
    if num_steps <= 1:
        return gr.Slider(visible=False, interactive=False)
    return gr.Slider(minimum=1, maximum=num_steps, value=num_steps if value is None else value,
                     interactive=True, visible=True)


def stopped_text(run: Run | None, started: float | None) -> str:
    """What Stop did, in the progress line's words (steps counted from 1)."""
    if run is None or started is None or run.started < started:
        return "**Stopped before the first step finished.**"
    if run.complete:
        return f"**The run finished (step {run.num_steps} of {run.config.steps}) before Stop took effect.**"
    return (f"**Stopped at step {run.num_steps} of {run.config.steps}.** The pictures show the last step that "
            "finished; there is no final image, so the classifier curves stop there and nothing can be moved.")


def wire(
    service: Service,
    tab: GenerateTab,
    run_state: gr.State,
    ledger: RunLedger,
    after_outputs: list[gr.components.Component],
    after_values: Callable[[Run | None, bool], list[Any]],
    stale_outputs: list[gr.components.Component],
    stale_values: Callable[[str], list[Any]],
    finish_outputs: list[gr.components.Component] = (),
    finish_inputs: list[gr.components.Component] = (),
    finish_values: Callable[..., list[Any]] | None = None,
) -> Any:
    """Connect Generate, Stop and the step slider.

    ``after_outputs`` are other tabs' components the run also updates (classifier curves live,
    the Intervene tab's picture at the end); ``after_values(run, finished)`` gives their values.
    ``stale_outputs`` are panels that belong to the previous run: ``stale_values(why)`` clears
    or marks them when a run starts (``why="running"``) or is stopped (``why="stopped"``).
    ``finish_values(run, *finish_inputs)`` fills ``finish_outputs`` when a run ends.
    """
    task_outputs = [tab.readouts[t] for t in TASKS]

    def check(prompt, seed, steps, guidance, foreground_site, depth_site, shading_site, attention_sites=None,
              preview_every=PREVIEW_EVERY):
        # A request the service would refuse is refused here, before anything changes on the page
        # (the previous run stays shown; an event with no outputs marks no panel "Error").
        try:
            service.config(prompt, seed, steps, guidance)
            service.resolve_sites({t: s for t, s in zip(TASKS, (foreground_site, depth_site, shading_site)) if s})
            service.resolve_attention_sites(attention_sites)
            service.preview_cadence(preview_every)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def start():
        # Runs at once (no queue): the button shows that a run is going and cannot be pressed
        # twice; Stop becomes pressable; the previous run's panels are cleared.
        return [gr.Button(value=RUNNING, interactive=False), gr.Button(interactive=True),
                "**A run is going…** (waiting for the model)", time.time(), *stale_values("running")]

    def generate(prompt, seed, steps, guidance, foreground_site, depth_site, shading_site, attention_sites=None,
                 preview_every=PREVIEW_EVERY, request: gr.Request = None):
        chosen = {t: s for t, s in zip(TASKS, (foreground_site, depth_site, shading_site)) if s}
        for warning in service.prompt_warnings(prompt):
            gr.Warning(warning, duration=12)
        try:
            # The model runs ahead in a thread of its own while this one draws and Gradio sends.
            with closing(service.generate_stream(prompt, seed, steps, guidance, chosen,
                                                 attention_sites=attention_sites, preview_every=preview_every,
                                                 prefetch=True)) as stream:
                for view in stream:
                    run = view.run
                    if view.step == 0:
                        ledger.stored(getattr(request, "session_hash", None))
                    # A component update rebuilds its config on every message: the slider is
                    # locked once, at the first step, and opened at the last.
                    scrub = (scrub_update(view.num_steps) if view.is_last
                             else gr.Slider(interactive=False) if view.step == 0 else gr.skip())
                    yield [*step_outputs(service, view, live=True), scrub, run, *after_values(run, view.is_last),
                           *extra_outputs(view, live=True)]
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def finish(run, *values):
        extra = finish_values(run, *values) if finish_values is not None else []
        return [gr.Button(value=GENERATE, interactive=service.ready), gr.Button(interactive=False), *extra]

    def stop(run, started):
        return [gr.Button(value=GENERATE, interactive=service.ready), gr.Button(interactive=False),
                stopped_text(run, started), *stale_values("stopped")]

    def scrub(run, step, request: gr.Request = None):
        try:
            shown = whole_number(step, "step")
            if run is None and (why := ledger.missing(getattr(request, "session_hash", None))):
                raise InputError(why)
            if run is not None and run.num_steps and not 1 <= shown <= run.num_steps:
                raise InputError(f"step must be between 1 and {run.num_steps} for this run, got {shown}")
            view = service.view_of(run, shown - 1)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return [*step_outputs(service, view), *extra_outputs(view)]

    inputs = [tab.prompt, tab.seed, tab.steps, tab.guidance, *[tab.sites[t] for t in TASKS], tab.attention_sites,
              tab.preview_every]
    extras = [tab.heat, tab.attention, tab.compare]
    outputs = [tab.preview, *task_outputs, tab.progress, tab.scrub, run_state, *after_outputs, *extras]
    control = [tab.button, tab.stop]
    # The check is queued (a refusal then shows as a message; unqueued events fail silently) but
    # never waits: no concurrency limit, so it runs at once even beside a run in progress.
    checked = tab.button.click(check, inputs, None, concurrency_limit=None, api_visibility="private",
                               show_progress="hidden")
    started = checked.success(start, None, [*control, tab.progress, tab.started, *stale_outputs], queue=False,
                              api_visibility="private", show_progress="hidden")
    event = started.success(
        generate, inputs, outputs, api_name="generate", concurrency_limit=1, concurrency_id=fields.MODEL_QUEUE,
        show_progress="minimal", show_progress_on=[tab.preview],
    )
    # The page does not follow .then() after a handler raised (a refused prompt): .failure() does,
    # so the button never stays "Running…" after an error.
    for follow in (event.then, event.failure):
        follow(finish, [run_state, *finish_inputs], [*control, *finish_outputs], queue=False,
               api_visibility="private", show_progress="hidden")
    # Enter in the prompt box presses the button, so a run going (button disabled) is not queued twice.
    tab.prompt.submit(None, None, None, js="() => { document.querySelector('#generate-btn')?.click(); }",
                      api_visibility="private")
    # Cancel first, then say where it stopped: written together, a step already on its way to the
    # page could land after "Stopped at step k" and overwrite it.
    cancelled = tab.stop.click(None, None, None, cancels=[event], api_visibility="private", queue=False)
    cancelled.then(stop, [run_state, tab.started], [*control, tab.progress, *stale_outputs],
                   api_visibility="private", queue=False, show_progress="hidden")
    # "input" fires when the slider is dragged and when a number is typed in its box.
    tab.scrub.input(
        scrub, [run_state, tab.scrub], [tab.preview, *task_outputs, tab.progress, *extras], api_name="scrub",
        concurrency_limit=fields.VIEW_CONCURRENCY, concurrency_id=fields.VIEW_QUEUE, show_progress="hidden", trigger_mode="always_last",
    )
    return event
