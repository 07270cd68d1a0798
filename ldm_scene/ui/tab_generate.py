"""Generate tab: prompt in, every denoising step out (x0 preview and the probes' readouts), live."""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from ..probes import TASKS
from .service import MAX_UI_STEPS, Run, Service, StepView

_TITLES = {
    "foreground": "Foreground probe (red = object)",
    "depth": "Depth probe (bright = near)",
    "shading": "Shading probe (bright = lit)",
}


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
    scrub: gr.Slider


def create(service: Service) -> GenerateTab:
    """Lay out the tab's components (events are wired in :func:`wire`)."""
    with gr.Row():
        with gr.Column(scale=2, min_width=280):
            prompt = gr.Textbox(label="Prompt", placeholder="a red cube", max_lines=3, elem_id="prompt")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                steps = gr.Slider(1, MAX_UI_STEPS, value=service.default_steps, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(0, 15, value=service.default_guidance, step=0.5, label="Guidance scale",
                                 info=service.guidance_note(), elem_id="guidance")
            sites = {}
            with gr.Accordion("Where the probes read (one site per task)", open=False):
                for task in TASKS:
                    choices = service.site_choices(task)
                    sites[task] = gr.Dropdown(
                        choices, value=service.default_site(task), label=f"{task} site",
                        interactive=bool(choices), elem_id=f"site-{task}",
                        info=None if choices else "no probe for this task",
                    )
                gr.Markdown(
                    f"Probes are fit for {service.probe_steps or '–'}-step runs; at other step counts the "
                    "preview streams without readouts. Default: the best site per task in the probe set's metrics."
                )
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="generate-btn", interactive=service.ready)
                stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            progress = gr.Markdown("", elem_id="gen-progress")
            examples = service.examples()
            if examples:
                gr.Examples(examples, [prompt, seed, steps, guidance], label="Examples", examples_per_page=6)
        with gr.Column(scale=3):
            size = service.display_size
            with gr.Row():
                preview = _image("Denoised estimate (x0) at this step", "preview", size)
                readouts = {"foreground": _image(_TITLES["foreground"], "readout-foreground", size)}
            with gr.Row():
                for task in ("depth", "shading"):
                    readouts[task] = _image(_TITLES[task], f"readout-{task}", size)
            scrub = gr.Slider(1, max(service.default_steps, 2), value=1, step=1, label="Scrub through the steps (after a run)",
                              interactive=False, elem_id="scrub")
    return GenerateTab(prompt, seed, steps, guidance, sites, button, stop, progress, preview, readouts, scrub)


def _image(label: str, elem_id: str, size: int) -> gr.Image:
    return gr.Image(label=label, type="pil", format="png", interactive=False, elem_id=elem_id,
                    height=min(size, 320), buttons=["download", "fullscreen"])


def step_outputs(service: Service, view: StepView) -> list[Any]:
    """The preview, the three readout pictures and the progress line for one step."""
    out = [view.preview]
    for task in TASKS:
        out.append(view.overlays.get(task))
    bar = "▰" * (view.step + 1) + "▱" * (view.num_steps - view.step - 1)
    text = f"**{view.label}** {bar}"
    if view.run.notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(view.run.notes))
    out.append(text)
    return out


def wire(
    service: Service,
    tab: GenerateTab,
    run_state: gr.State,
    after_outputs: list[gr.components.Component],
    after_values: Callable[[Run | None, bool], list[Any]],
) -> Any:
    """Connect Generate, Stop and the scrub slider.

    ``after_outputs`` are other tabs' components the run also updates (classifier curves live,
    the Intervene tab's picture at the end); ``after_values(run, finished)`` gives their values.
    """
    task_outputs = [tab.readouts[t] for t in TASKS]

    def generate(prompt, seed, steps, guidance, *sites):
        chosen = {t: s for t, s in zip(TASKS, sites) if s}
        try:
            with closing(service.generate_stream(prompt, seed, steps, guidance, chosen)) as stream:
                for view in stream:
                    run = view.run
                    scrub = (gr.Slider(minimum=1, maximum=max(view.num_steps, 2), value=view.num_steps, interactive=True)
                             if view.is_last else gr.Slider(interactive=False))
                    yield [*step_outputs(service, view), scrub, run, *after_values(run, view.is_last)]
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def scrub(run, step):
        try:
            view = service.view_of(run, int(step) - 1)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return step_outputs(service, view)

    inputs = [tab.prompt, tab.seed, tab.steps, tab.guidance, *[tab.sites[t] for t in TASKS]]
    outputs = [tab.preview, *task_outputs, tab.progress, tab.scrub, run_state, *after_outputs]
    event = tab.button.click(
        generate, inputs, outputs, api_name="generate", concurrency_limit=1, concurrency_id="model",
        show_progress="minimal", show_progress_on=[tab.preview],
    )
    submitted = tab.prompt.submit(
        generate, inputs, outputs, api_visibility="private", concurrency_limit=1, concurrency_id="model",
        show_progress="minimal", show_progress_on=[tab.preview],
    )
    tab.stop.click(None, None, None, cancels=[event, submitted], api_visibility="private")
    tab.scrub.release(
        scrub, [run_state, tab.scrub], [tab.preview, *task_outputs, tab.progress], api_name="scrub",
        concurrency_limit=None, show_progress="hidden", trigger_mode="always_last",
    )
    return event
