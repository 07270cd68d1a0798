"""The app's service: one object that owns the model, probes, labeler, classifier and the model lock.

Everything here is plain Python, numpy and PIL: the Gradio handlers in this package are a few lines
over it, and the tests drive it without a server. The service holds nothing a request can change:
what one user generated lives in a :class:`~.views.Run` that the caller keeps (in ``gr.State`` in
the app) and passes back. Model work (generate, intervene, classify) runs one job at a time under a
lock, because the readers and edits hook the one shared UNet; the hooks themselves are the
library's (:func:`~ldm_scene.sampler.sample`, :func:`~ldm_scene.intervention.intervene`), never
added here.

:meth:`Service.load` never raises for a missing or mismatched model or probe set: it returns a
service whose :meth:`~Service.status_markdown` says what is wrong and how to fix it, so the page
can explain itself instead of showing a traceback. The pieces live beside it: :mod:`.views` (what
it hands out), :mod:`.drawing` (how a step looks), :mod:`.loading`, :mod:`.probe_set`,
:mod:`.prompts`, :mod:`.previews` (when the stream decodes) and :mod:`.results`.
"""
from __future__ import annotations

import threading
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..attention import AttentionError, attention_reader
from ..models import Model
from ..probes import TASKS, GroupProbe, ProbeBank
from ..readout import ProbeReader, SiteChoice
from ..sampler import (
    DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig, GenerationError, check_prompt, config_for, decode,
    describe_guidance, sample,
)
from . import choices, previews, prompts, targets
from .choices import ATTENTION_GROUPS, DEFAULT_ATTENTION_GROUP, DEFAULT_ATTENTION_SITES  # noqa: F401
from .targets import MAX_SHIFT_FRACTION  # noqa: F401  (re-exported)
from .drawing import MAP_STYLE, Painter  # noqa: F401  (MAP_STYLE re-exported)
from .inputs import ServiceError, finite_number, whole_number
from .loading import load_parts
from .prefetch import prefetched
from .previews import PREVIEW_EVERY, decoded_live
from .probe_set import group_mismatch, readable_sites
from .site_menu import BEST_PER_STEP, SiteMenu  # noqa: F401  (BEST_PER_STEP re-exported)
from .results import Results, results_page
from .views import Comparison, InterventionView, Run, StepView, centroid  # noqa: F401  (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples"
#: The UI's limits (the library allows more; a public app should not run 200 steps per click).
MAX_UI_STEPS = 50


class Service:
    """Owns the model, probes, labeler, classifier, device and the lock around model work.

    Build it with :meth:`load`. ``model`` is None when loading failed (``problems`` says why).
    ``banks`` are the readout probes by task; ``intervention_banks`` what the edits need
    (``foreground`` and ``foreground_means``). ``display_size`` is the side in pixels of the pictures
    handed to the UI.
    """

    def __init__(
        self,
        model: Model | None,
        banks: Mapping[str, ProbeBank] | None = None,
        intervention_banks: Mapping[str, ProbeBank] | None = None,
        metrics: Mapping[str, Any] | None = None,
        probe_dir: Path | None = None,
        labeler: Any = None,
        classifier: Any = None,
        problems: Sequence[str] = (),
        notes: Sequence[str] = (),
        display_size: int = 256,
        examples_dir: Path = EXAMPLES_DIR,
        lock_timeout: float = 600.0,
        group_probe: GroupProbe | None = None,
    ) -> None:
        self.model = model
        device = model.device if model is not None else torch.device("cpu")
        self.banks = {t: b.to(device) for t, b in (banks or {}).items()}
        self.intervention_banks = {t: b.to(device) for t, b in (intervention_banks or {}).items()}
        self.notes = list(notes)
        # A group probe is offered beside the foreground bank it was fit with (same images, labels, guidance).
        why = group_mismatch(group_probe, self.banks.get("foreground")) if group_probe is not None else None
        if why:
            self.notes.append(f"The foreground probe over {group_probe.name} is not used: {why}.")
            group_probe = None
        self.group_probe = group_probe.to(device) if group_probe is not None else None
        self.metrics = dict(metrics or {})
        self.menu = SiteMenu(self.banks, self.metrics, self.group_probe)
        self.probe_dir = probe_dir
        self.labeler = labeler
        self.classifier = classifier
        self.problems = list(problems)
        size = max(model.image_size) if model is not None else display_size
        self.display_size = max(int(display_size), size)
        self.examples_dir = Path(examples_dir)
        self.lock_timeout = float(lock_timeout)
        self._lock = threading.Lock()
        self.painter = Painter(self.banks, self.display_size)

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_name: str = "toy",
        probe_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        classifier: Any = True,
        **kwargs: Any,
    ) -> "Service":
        """Load a model and its probe set; failures become messages in ``problems``, never raises.

        ``probe_dir`` defaults to the ``probes/`` folder shipped beside a local model. A probe
        file that does not fit the model (another model, image size, channels, a corrupt or
        pickle file) is refused with the loader's message, which names it; the other files are
        still used, and without any the app generates without readouts. ``classifier``: True picks
        one for the model (:func:`ldm_scene.classify.classifier_for`: the toy shape classifier, else
        VGG-16, downloaded on first use), False none, or pass a classifier object.
        """
        p = load_parts(model_name, probe_dir, device, classifier)
        kwargs.setdefault("group_probe", p.group_probe)
        return cls(p.model, p.banks, p.intervention_banks, p.metrics, p.probe_dir, p.labeler, p.classifier, p.problems,
                   p.notes, **kwargs)

    # --- facts for the UI ---------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether a model is loaded (generation works; readouts need probes too)."""
        return self.model is not None

    @property
    def probe_steps(self) -> int | None:
        """The schedule length the probes were fit for (readouts are shown only at that length)."""
        steps = {b.meta.num_steps for b in self.banks.values()}
        return steps.pop() if len(steps) == 1 else (min(steps) if steps else None)

    @property
    def default_steps(self) -> int:
        return self.probe_steps or DEFAULT_STEPS

    @property
    def default_guidance(self) -> float:
        """The loaded model's own guidance scale (the toy model's ``ldm_scene.json``; else 7.5)."""
        return self.model.default_guidance if self.model is not None else DEFAULT_GUIDANCE

    def guidance_note(self) -> str | None:
        """What the model does to guidance late in the run, for the slider's info line (None: nothing)."""
        m = self.model
        if m is None or m.late_guidance is None:
            return None
        return f"This model runs at {describe_guidance(m.default_guidance, m.late_guidance, m.late_from)}; the slider sets the first number."

    def status_markdown(self) -> str:
        """What is loaded and what is not, with how to fix it; shown at the top of the page."""
        if self.model is None:
            lines = ["### The app could not start its model", *[f"- {p}" for p in self.problems]]
            lines.append("\nStart the app with `python app.py --model M`: `--model toy` for the embedded toy model, "
                         "a local diffusers directory, or `sd14` (Stable Diffusion v1.4 from the Hub, with network).")
            return "\n".join(lines)
        h, w = self.model.image_size
        parts = [f"Model **{self.model.model_id}** ({h}x{w} px, {self.model.device.type})"]
        if self.banks:
            parts.append(f"probes: {', '.join(self.banks)} (fit for {self.probe_steps}-step runs)")
        if self.group_probe is not None:
            parts.append(f"foreground also from {self.group_probe.name}")
        if self.classifier is not None:
            parts.append("classifier loaded")
        text = " · ".join(parts)
        issues = [*self.problems, *self.notes]
        if issues:
            text += "\n\n" + "\n".join(f"- {p}" for p in issues)
        return text

    def site_choices(self, task: str) -> list[str]:
        """The site options for a task (:meth:`.site_menu.SiteMenu.choices`)."""
        return self.menu.choices(task)

    def default_site(self, task: str) -> str | None:
        """The site a task reads unless the page says otherwise (:meth:`.site_menu.SiteMenu.default`)."""
        return self.menu.default(task)

    def default_sites(self) -> dict[str, str]:
        return self.menu.defaults()

    def examples(self) -> list[list[Any]]:
        """``[prompt, seed, steps, guidance]`` rows from ``examples/prompts.json`` this model can read."""
        if self.model is None:
            return []
        return prompts.examples(self.examples_dir / "prompts.json", self.model.pipe.tokenizer, self.default_steps,
                                self.default_guidance)

    def vocabulary(self) -> tuple[str, ...]:
        """The words a word-level model knows, for the page to list; ``()`` for SD (open vocabulary)."""
        return prompts.vocabulary(self.model.pipe.tokenizer) if self.model is not None else ()

    def prompt_warnings(self, prompt: Any) -> list[str]:
        """Why a prompt may not mean what it says to this model (shown as warnings, never refused)."""
        return prompts.prompt_warnings(self.vocabulary(), prompt)

    def shipped_emergence(self, run: Run | None = None) -> dict[str, tuple[str, list[float]]]:
        """The probe set's test-split curves, the group probe's where ``run`` read the foreground with it."""
        return self.menu.shipped_emergence(run.sites if run is not None else None)

    def attention_choices(self) -> list[str]:
        """The attention-site options: the groups of :data:`.choices.ATTENTION_GROUPS`, then each site."""
        return choices.attention_choices() if self.model is not None else []

    def resolve_attention_sites(self, sites: str | Sequence[str] | None) -> tuple[str, ...]:
        """Where to read the per-word maps (:func:`.choices.attention_sites`)."""
        return choices.attention_sites(sites)

    # --- validation ------------------------------------------------------------------------
    def _require_model(self) -> Model:
        if self.model is None:
            raise ServiceError("no model is loaded: " + " ".join(self.problems))
        return self.model

    def config(self, prompt: Any, seed: Any, steps: Any, guidance: Any) -> GenerationConfig:
        """Validate a generation request (types, ranges, prompt length) into a :class:`GenerationConfig`."""
        model = self._require_model()
        seed, steps = whole_number(seed, "seed"), whole_number(steps, "steps")
        if steps is not None and not 1 <= steps <= MAX_UI_STEPS:
            raise GenerationError(f"steps must be between 1 and {MAX_UI_STEPS} in this app, got {steps}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.integer, np.floating)):
            raise GenerationError(f"guidance must be a number between 0 and 30, got {guidance!r}")
        # The model's late cap (its ldm_scene.json) applies under whatever scale the slider sets.
        config = config_for(model, prompt, seed, steps, float(guidance))
        check_prompt(model, config.prompt)
        return config

    def resolve_sites(self, sites: Mapping[str, str | None] | None) -> dict[str, SiteChoice]:
        """Turn the UI's per-task site names into reader choices; defaults where a task has none."""
        return self.menu.resolve(sites)

    # --- model work --------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        # The probes and edits hook the one shared UNet: two jobs at once would read each other.
        if not self._lock.acquire(timeout=self.lock_timeout):
            raise ServiceError("the model is busy with another job; try again in a moment")
        try:
            yield
        finally:
            self._lock.release()

    def generate_stream(
        self,
        prompt: Any,
        seed: Any = 0,
        steps: Any = None,
        guidance: Any = None,
        sites: Mapping[str, str | None] | None = None,
        track_classes: bool = True,
        attention_sites: Sequence[str] | None = None,
        preview_every: Any = PREVIEW_EVERY,
        prefetch: bool = False,
    ) -> Iterator[StepView]:
        """Denoise ``prompt`` and yield a :class:`StepView` after every step.

        Bad input raises :class:`~ldm_scene.sampler.GenerationError` / :class:`ServiceError`
        (both ``ValueError``) before any model work. Each view's ``run`` is the :class:`Run` so
        far (complete on the last step, with the object's mask, the emergence scores and the
        classifier's curves). ``attention_sites`` are where the prompt words' cross-attention maps
        are read (default: every site; ``[]``: none). ``preview_every``: the x0 estimate is decoded
        (and labelled and classified) at the first step, every ``preview_every`` steps and at the
        last (1: every step); a view between shows the latest decoded one (its ``preview_step``).
        Closing the stream early stops the model and removes its hooks; the run then keeps the
        steps that were handed out.

        ``prefetch``: the UNet's steps (with the readers, under the model lock) run in a thread of
        their own, up to :data:`.prefetch.DEPTH` steps ahead, while the caller's thread decodes,
        labels, classifies and draws them and hands them on (:func:`.prefetch.prefetched`): the
        app's stream overlaps the UNet with that work and with Gradio's sending of the last step.
        """
        every = self.preview_cadence(preview_every)
        config = self.config(prompt, seed, steps if steps is not None else self.default_steps,
                             guidance if guidance is not None else self.default_guidance)
        choices = self.resolve_sites(sites)
        attn_sites = self.resolve_attention_sites(attention_sites)
        run = Run(config, choices, attention_sites=attn_sites)
        readable = readable_sites(self.banks, choices, config.steps, run.notes)
        model = self._require_model()
        readers: list[Any] = []
        if readable:
            readers.append(ProbeReader({t: self.banks[t] for t in readable}, readable))
        if attn_sites:
            try:
                readers.append(attention_reader(model, config.prompt, attn_sites))
            except AttentionError as err:  # a prompt whose words cannot be named: generate without maps
                run.notes.append(f"no cross-attention maps: {err}")
        tracker = self._tracker(config.prompt) if track_classes else None

        def model_steps() -> Iterator[Any]:
            # The UNet's part of each step, with its readers (under the lock: they hook the UNet).
            with self._exclusive(), closing(sample(model, config, readers=readers)) as states:
                for state in states:
                    run.record(state, None)
                    yield state

        shown = 0
        try:
            with closing(prefetched(model_steps) if prefetch else model_steps()) as steps:
                for state in steps:
                    # The VAE needs no lock: it decodes here, beside the UNet's next step when prefetching.
                    if decoded_live(state.step, state.num_steps, every):
                        run.previews[state.step] = decode(model, state.x0)[0]
                    preview = run.previews[state.step]
                    run.preview_labels.append(self._labels(preview))
                    if tracker is not None and preview is not None:
                        run.curves = tracker.update(state.step, preview)
                    if state.image is not None:
                        run.image = state.image
                        self._finish(run)
                    # Between decoded steps the strips (maps beside the x0 estimate) wait for the next one.
                    view = self.painter.step(run, state.step, state.image, strips=preview is not None)
                    shown += 1
                    yield view
        finally:
            run.keep_steps(shown)  # a stopped run keeps what was shown, not what was computed ahead

    @staticmethod
    def preview_cadence(preview_every: Any) -> int:
        """``preview_every`` checked: a whole number of steps from 1 to the UI's step limit."""
        return previews.checked_cadence(preview_every, MAX_UI_STEPS)

    def view_of(self, run: Run, step: Any) -> StepView:
        """Re-draw a stored step of ``run`` (the scrub slider), without model work.

        ``step`` is 0-based like every ``step`` in the code; messages count from 1, as the page does.
        """
        if run is None or not run.num_steps:
            raise ServiceError("nothing to show yet: generate an image first")
        step = whole_number(step, "step")
        if not 0 <= step < run.num_steps:
            raise ServiceError(f"there is no step {step + 1}: this run has steps 1 to {run.num_steps}")
        self.decode_previews(run, [step])
        return self.painter.step(run, step, run.image if step == run.num_steps - 1 else None)

    def decode_previews(self, run: Run, steps: Sequence[int] | None = None) -> None:
        """Decode and label the previews of ``steps`` (default: all) that the live stream skipped, in place
        (:func:`.previews.fill_previews`). Only the VAE and the labeler run, no hooks: no model lock, so
        scrubbing stays quick while another job holds the UNet."""
        previews.fill_previews(run, self._require_model(), self._labels, steps)

    def classify(self, run: Run) -> Any:
        """The classifier's per-step curves for a stored run (recomputed from its previews)."""
        if run is None or not run.num_steps:
            raise ServiceError("nothing to classify yet: generate an image first")
        if self.classifier is None:
            raise ServiceError("no classifier is available for this model (see the notes at the top)")
        from ..classify import classify_run

        with self._exclusive():
            self.decode_previews(run)
            return classify_run(self.classifier, run.previews, run.config.prompt)

    # --- intervention -------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        from ..intervention import available_methods

        return available_methods(self.intervention_banks)

    def require_complete(self, run: Run | None) -> Run:
        """``run`` if it finished; else ServiceError saying there is none or that it was stopped."""
        return targets.require_complete(run)

    def shift_target(self, run: Run | None, dx: Any, dy: Any) -> np.ndarray:
        """The run's object mask moved ``dx`` px right and ``dy`` px down (:func:`.targets.shifted`)."""
        return targets.shifted(run, dx, dy)

    def drawn_target(self, layers: Sequence[Any] | None) -> np.ndarray:
        """A target mask at the model's size from the editor's layers (:func:`.targets.drawn`)."""
        return targets.drawn(layers, self._require_model().image_size)

    def intervene_stream(
        self, run: Run | None, target: np.ndarray, method: str = "latent-move", strength: Any = 1.0
    ) -> Iterator[InterventionView]:
        """Re-run ``run``'s prompt and seed while editing activations towards ``target``; stream it.

        Yields an :class:`InterventionView` per step (the preview with the foreground probe's
        outline); the last carries a :class:`Comparison` of original, target and result with IoU.
        The probe reader goes to :func:`~ldm_scene.intervention.intervene` with the edit, which
        hooks both for exactly the stream's lifetime. Outside the object's old mask and the target
        (grown by :data:`~ldm_scene.edit_methods.KEEP_MARGIN` latent cells) every step keeps
        ``run``'s own latent, so the rest of the scene stays as it was.
        """
        from ..intervention import (
            InterventionError, default_edit_steps, intervene, keep_background, labeler_locator, make_editor,
        )

        model = self._require_model()
        targets.require_complete(run)
        target = np.asarray(target)
        if target.dtype != bool or target.shape != tuple(model.image_size):
            raise InterventionError(f"target must be a bool mask of {model.image_size}, got {target.dtype} {target.shape}")
        targets.check_method(method, self.methods, self.intervention_banks, run)
        strength = finite_number(strength, "strength")
        edit_steps = default_edit_steps(run.config.steps, method)
        # Build the editor up front so a missing probe or mask is reported before any model work (and
        # the kept background is sized by it); intervene uses this one.
        # A move finds the object again (the labeler on the decoded x0) to correct where it landed.
        locate = None if self.labeler is None else labeler_locator(model, self.labeler)
        editor = make_editor(method, self.intervention_banks, target, None, edit_steps, strength, run.config.seed,
                             run.foreground, locate)
        config = run.config
        edited = Run(config, run.sites, kind=f"intervene:{method}")
        foreground = {"foreground": run.sites["foreground"]} if "foreground" in run.sites else {}
        readable = readable_sites(self.banks, foreground, config.steps, edited.notes)
        # The reader is hooked before the editor, so it sees each site's activation as the UNet made it.
        readers = [ProbeReader({"foreground": self.banks["foreground"]}, readable)] if readable else []
        # Outside the object's old place and its target the edited run keeps the original's latents.
        keep = (keep_background(run.trajectory, run.foreground, target, editor=editor, image=run.image)
                if len(run.trajectory) == run.num_steps == config.steps else None)
        with self._exclusive(), ExitStack() as stack:
            states = intervene(model, config, target, method, self.intervention_banks, steps=edit_steps,
                               strength=strength, previews=True, readers=readers, keep=keep, source=run.foreground,
                               locate=locate, editor=editor)
            stack.callback(states.close)
            for state in states:
                self._record(edited, state)
                comparison = None
                if state.image is not None:
                    edited.image = state.image
                    self._finish(edited, emergence_curves=False)
                    comparison = Comparison.of(run, edited, target, method)
                view = self.painter.step(edited, state.step, state.image)
                yield InterventionView(**vars(view), comparison=comparison)

    # --- results ------------------------------------------------------------------------------
    def results(self) -> Results:
        """The probe set's shipped evaluation: a summary table, its README, the model's report, figures."""
        return results_page(self.probe_dir, self.model.directory if self.model is not None else None, self.metrics)

    # --- internals -----------------------------------------------------------------------------
    def _tracker(self, prompt: str) -> Any:
        if self.classifier is None:
            return None
        from ..classify import CurveTracker

        return CurveTracker(self.classifier, prompt)

    def _record(self, run: Run, state: Any) -> None:
        """Keep one step of ``run`` (:meth:`.views.Run.record`) with its preview (the state's, else
        decoded here) and the labeler's view of it."""
        preview = state.preview if state.preview is not None else decode(self._require_model(), state.x0)[0]
        run.record(state, preview)
        run.preview_labels.append(self._labels(preview))

    def _finish(self, run: Run, emergence_curves: bool = True) -> None:
        """Find the finished image's object and score every step against the final labels (:meth:`.views.Run.finish`)."""
        run.finish(self._labels(run.image), self._require_model().image_size, emergence_curves)

    def _labels(self, image: Image.Image | None) -> dict[str, np.ndarray] | None:
        if self.labeler is None or image is None:
            return None
        out = self.labeler(np.asarray(image.convert("RGB"))[None])
        return {t: np.asarray(out[t][0]) for t in TASKS if t in out}

    def display(self, image: Image.Image) -> Image.Image:
        """An image at the UI's display size (pixels kept sharp for small models)."""
        return self.painter.display(image)

    def outline(self, image: Image.Image, mask: np.ndarray | None) -> Image.Image:
        """``image`` at display size with ``mask``'s outline drawn on it (the image itself untouched)."""
        return self.painter.outline(image, mask)

    def mask_picture(self, mask: np.ndarray, over: Image.Image | None = None) -> Image.Image:
        """A mask drawn for the UI: red over ``over`` (the image it belongs to), or white on black."""
        return self.painter.mask_picture(mask, over)

