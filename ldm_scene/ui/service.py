"""The app's service: one object that owns the model, probes, labeler, classifier and the model lock.

Everything here is plain Python, numpy and PIL: the Gradio handlers in this package are a few lines
over it, and the tests drive it without a server. The service holds nothing a request can change:
what one user generated lives in a :class:`Run` that the caller keeps (in ``gr.State`` in the
app) and passes back. Model work (generate, intervene, classify) runs one job at a time under a
lock, because the probes and edits hook the one shared UNet.

:meth:`Service.load` never raises for a missing or mismatched model or probe set: it returns a
service whose :meth:`~Service.status_markdown` says what is wrong and how to fix it, so the page
can explain itself instead of showing a traceback.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..capture import hook_sites
from ..metrics import iou
from ..models import ALIASES, TOY_MODEL_DIR, Model, ModelLoadError, load_model
from ..probes import CLASS_MEANS, TASKS, ProbeBank, load_probe_dir
from ..readout import ProbeReader, SiteChoice, emergence, foreground_overlay, upsample_nearest, value_range
from ..sampler import (
    DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig, GenerationError, check_prompt, config_for, describe_guidance,
    sample,
)
from ..viz import colour_bar_picture, outline_picture
from .inputs import check_array_image, check_image_size, finite_number, whole_number

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples"
#: The site choice that reads, at each step, the site that scored best at that step (metrics.json).
BEST_PER_STEP = "best site at each step"
#: A tokenizer with at most this many tokens is word-level (the toy and tiny models'); SD's CLIP
#: BPE has 49,408 and an open vocabulary, so its words are neither listed nor checked.
WORD_LEVEL_MAX_TOKENS = 1000
#: The UI's limits (the library allows more; a public app should not run 200 steps per click).
MAX_UI_STEPS = 50
MAX_SHIFT_FRACTION = 0.75


class ServiceError(ValueError):
    """A request the service cannot serve; the message is meant for the user."""


# --- what the service hands out -------------------------------------------------------------------


@dataclass
class Run:
    """One user's generation (or edited generation), kept by the caller between requests.

    ``previews[s]`` is the decoded x0 prediction after step ``s``; ``readouts[s]`` the probe maps at
    their sites' grids. ``foreground`` is the finished image's object mask at image size (from
    the model's labeler, else the foreground probe at the last step), which the Intervene tab
    moves. ``reference`` holds what each step is scored against for the emergence curves.
    ``started`` is the wall-clock time the run began (the page tells a stopped run from an old one).
    """

    config: GenerationConfig
    sites: dict[str, SiteChoice]
    kind: str = "generate"
    previews: list[Image.Image] = field(default_factory=list)
    readouts: list[dict[str, np.ndarray]] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    image: Image.Image | None = None
    foreground: np.ndarray | None = None
    foreground_source: str = ""
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    reference_source: str = ""
    emergence: dict[str, list[float]] = field(default_factory=dict)
    curves: Any = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def complete(self) -> bool:
        return self.image is not None

    @property
    def num_steps(self) -> int:
        return len(self.previews)


#: How depth and shading maps are drawn: colour map, and what its low and high ends mean.
MAP_STYLE = {"depth": ("magma_r", "near", "far"), "shading": ("gray", "dark", "lit")}


@dataclass
class StepView:
    """What one step looks like: the preview, each task's picture and map, and where the run is.

    ``overlays``: foreground as the outline of ``p > 0.5`` over the clean preview; depth and
    shading as colour maps with a colour bar over a fixed range. ``foreground_heat`` is the
    foreground probability as a heat map with its colour bar (None without a foreground readout).
    """

    step: int
    num_steps: int
    timestep: float
    preview: Image.Image
    overlays: dict[str, Image.Image]
    readouts: dict[str, np.ndarray]
    run: Run
    image: Image.Image | None = None
    foreground_heat: Image.Image | None = None

    @property
    def is_last(self) -> bool:
        return self.step == self.num_steps - 1

    @property
    def label(self) -> str:
        return f"step {self.step + 1} of {self.num_steps} (scheduler timestep {self.timestep:.0f})"


@dataclass
class Comparison:
    """The end of an intervention: original, target and result, with how well the result fits."""

    original: Image.Image
    target: np.ndarray
    result: Image.Image
    result_mask: np.ndarray
    original_mask: np.ndarray
    iou_target: float
    iou_original_target: float
    mask_source: str
    method: str

    def numbers(self) -> dict[str, Any]:
        """The comparison as plain numbers (for the API): IoUs and mask centroids (x, y) in pixels."""
        return {
            "method": self.method,
            "iou_result_target": round(self.iou_target, 4),
            "iou_original_target": round(self.iou_original_target, 4),
            "original_centroid": centroid(self.original_mask),
            "target_centroid": centroid(self.target),
            "result_centroid": centroid(self.result_mask),
            "mask_source": self.mask_source,
        }

    def summary(self) -> str:
        return (
            f"**{self.method}**: IoU of the result's foreground with the target **{self.iou_target:.2f}** "
            f"(the original's was {self.iou_original_target:.2f}; foreground from {self.mask_source})."
        )


@dataclass
class InterventionView(StepView):
    comparison: Comparison | None = None


@dataclass
class Results:
    """The shipped evaluation of the loaded model's probes: text, tables and figures."""

    markdown: str
    figures: list[tuple[Image.Image, str]]


# --- the service ------------------------------------------------------------------------------------


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
    ) -> None:
        self.model = model
        device = model.device if model is not None else torch.device("cpu")
        self.banks = {t: b.to(device) for t, b in (banks or {}).items()}
        self.intervention_banks = {t: b.to(device) for t, b in (intervention_banks or {}).items()}
        self.metrics = dict(metrics or {})
        self.probe_dir = probe_dir
        self.labeler = labeler
        self.classifier = classifier
        self.problems = list(problems)
        self.notes = list(notes)
        size = max(model.image_size) if model is not None else display_size
        self.display_size = max(int(display_size), size)
        self.examples_dir = Path(examples_dir)
        self.lock_timeout = float(lock_timeout)
        self._lock = threading.Lock()

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
        problems: list[str] = []
        notes: list[str] = []
        try:
            model = load_model(model_name, device=device)
            model.sites()  # a UNet without SD v1.4's layout has no probe sites: refuse it here
        except (ModelLoadError, OSError, ValueError, RecursionError) as err:
            shown = ALIASES.get(model_name, model_name)
            problems.append(f"The model `{shown}` could not be loaded: {err}")
            if model_name == "toy" or Path(shown) == TOY_MODEL_DIR:
                problems.append("The embedded toy model is built by `python -m ldm_scene.toy train` into "
                                "`weights/toy-scenes` (see the README).")
            return cls(None, problems=problems, **kwargs)
        banks, means, metrics, folder = {}, {}, {}, None
        if probe_dir is not None:
            folder = Path(probe_dir)
        else:
            folder = model.extra_dir("probes")
        if folder is None:
            problems.append(
                f"No probe set for `{model.model_id}`: it ships no `probes/` folder. Generation works; "
                "probe readouts and the intervention need one (`--probes DIR`)."
            )
        elif not folder.is_dir():
            problems.append(f"The probe folder `{folder}` does not exist; generation works without readouts.")
            folder = None
        else:
            banks, means, refused = _load_probes(model, folder)
            problems.extend(refused)
            if not banks and not refused:
                problems.append(f"`{folder}` holds no probe files (`foreground/depth/shading.safetensors`).")
            metrics, metric_problem = _load_metrics(folder)
            if metric_problem:
                notes.append(metric_problem)
        labeler = _load_labeler(model, notes)
        if classifier is True:
            classifier = _load_classifier(model, device, notes)
        elif classifier is False:
            classifier = None
        return cls(model, banks, means, metrics, folder, labeler, classifier, problems, notes, **kwargs)

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
        if self.classifier is not None:
            parts.append("classifier loaded")
        text = " · ".join(parts)
        issues = [*self.problems, *self.notes]
        if issues:
            text += "\n\n" + "\n".join(f"- {p}" for p in issues)
        return text

    def site_choices(self, task: str) -> list[str]:
        """The site options for a task: the per-step best (if the metrics say) and every probed site."""
        bank = self.banks.get(task)
        if bank is None:
            return []
        options = list(bank.sites)
        if self._best_per_step(task):
            options.insert(0, BEST_PER_STEP)
        return options

    def default_site(self, task: str) -> str | None:
        """The best site for a task from metrics.json, else the finest-grid decoder site probed."""
        bank = self.banks.get(task)
        if bank is None:
            return None
        best = _task_metrics(self.metrics, task).get("best_site")
        if isinstance(best, str) and best in bank.sites:
            return best
        return max(bank.sites, key=lambda s: (bank.meta.sites[s][1], s.startswith("up_blocks"), s))

    def default_sites(self) -> dict[str, str]:
        return {t: s for t in self.banks if (s := self.default_site(t)) is not None}

    def examples(self) -> list[list[Any]]:
        """``[prompt, seed, steps, guidance]`` rows from ``examples/prompts.json`` this model can read.

        A prompt is offered only if every word is one token for this model's tokenizer, so the
        toy model gets its own vocabulary's prompts and SD the photographic ones.
        """
        path = self.examples_dir / "prompts.json"
        if self.model is None or not path.is_file():
            return []
        try:
            rows = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            log.warning("examples: cannot read %s: %s", path, type(err).__name__)
            return []
        if not isinstance(rows, list):
            log.warning("examples: %s is not a JSON list", path)
            return []
        tok = self.model.pipe.tokenizer
        out = []
        for row in rows:
            if not isinstance(row, dict):
                continue
            prompt = str(row.get("prompt", ""))
            words = prompt.lower().split()
            if not words or any(len(tok(w, add_special_tokens=False).input_ids) != 1 for w in words):
                continue
            # Steps follow the loaded probes (readouts exist only at the length they were fit for).
            guidance = float(row.get("guidance", self.default_guidance))
            out.append([prompt, int(row.get("seed", 0)), self.default_steps, guidance])
        return out

    def vocabulary(self) -> tuple[str, ...]:
        """The words a word-level model knows, for the page to list; ``()`` for SD (open vocabulary).

        A word-level tokenizer also holds every letter (an unknown word falls apart into letters
        and means nothing to the model), so its token list is not a word list: the words are the
        toy world's prompt words that this tokenizer keeps whole.
        """
        if self.model is None:
            return ()
        tok = self.model.pipe.tokenizer
        if len(tok) > WORD_LEVEL_MAX_TOKENS:
            return ()
        from ..toy.render import PROMPT_WORDS

        return tuple(w for w in PROMPT_WORDS if len(tok(w, add_special_tokens=False).input_ids) == 1)

    def prompt_warnings(self, prompt: Any) -> list[str]:
        """Why a prompt may not mean what it says to this model (shown as warnings, never refused).

        For a word-level model: place words (toy prompts only say what the object is; the noise
        decides where) and words outside its vocabulary. Nothing for SD or for non-text input
        (which :meth:`config` refuses).
        """
        vocab = self.vocabulary()
        if not vocab or not isinstance(prompt, str):
            return []
        from ..toy.render import PLACE_WORDS

        words = list(dict.fromkeys(re.findall(r"[^\W_]+", prompt.lower())))
        place = [w for w in words if w in PLACE_WORDS]
        unknown = [w for w in words if w not in vocab and w not in PLACE_WORDS]
        out = []
        if place:
            out.append(f"{_quoted(place)}: this model's prompts never say where the object is; the noise decides "
                       "its place, so place words are ignored at best.")
        if unknown:
            out.append(f"{_quoted(unknown)} {'is' if len(unknown) == 1 else 'are'} not in this model's vocabulary "
                       f"({', '.join(vocab)}); the model cannot read {'it' if len(unknown) == 1 else 'them'}.")
        return out

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
        sites = dict(sites or {})
        unknown = sorted(set(sites) - set(TASKS))
        if unknown:
            raise ServiceError(f"unknown task(s) {unknown}; tasks are {', '.join(TASKS)}")
        out: dict[str, SiteChoice] = {}
        for task in self.banks:
            name = sites.get(task) or self.default_site(task)
            if name == BEST_PER_STEP:
                per_step = self._best_per_step(task)
                if not per_step:
                    raise ServiceError(f"{task}: the metrics name no best site per step; pick a site")
                out[task] = per_step
            elif name in self.banks[task].sites:
                out[task] = name
            else:
                raise ServiceError(
                    f"{task}: no probe at site {name!r}; choose one of {', '.join(self.site_choices(task))}"
                )
        return out

    def shipped_emergence(self) -> dict[str, tuple[str, list[float]]]:
        """The probe set's test-split score per step at the best site, ``{task: (metric, scores)}``.

        Read from metrics.json (``tasks[task]["best_per_step"]`` when it is a list of numbers).
        """
        out = {}
        for task in TASKS:
            entry = _task_metrics(self.metrics, task)
            raw = entry.get("best_per_step")
            if isinstance(raw, (list, tuple)) and raw and all(v is None or isinstance(v, (int, float)) for v in raw):
                scores = [float("nan") if v is None else float(v) for v in raw]
                out[task] = (str(entry.get("metric", "score")), scores)
        return out

    def _best_per_step(self, task: str) -> dict[int, str]:
        bank = self.banks.get(task)
        entry = _task_metrics(self.metrics, task)
        # metrics.json names the sites in best_site_per_step (best_per_step holds their scores)
        raw = entry.get("best_site_per_step", entry.get("best_per_step"))
        if bank is None or raw is None:
            return {}
        return {s: site for s, site in _parse_per_step(raw).items() if (site, s) in bank}

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
    ) -> Iterator[StepView]:
        """Denoise ``prompt`` and yield a :class:`StepView` after every step.

        Bad input raises :class:`~ldm_scene.sampler.GenerationError` / :class:`ServiceError`
        (both ``ValueError``) before any model work. Each view's ``run`` is the :class:`Run` so
        far (complete on the last step, with the object's mask, the emergence scores and the
        classifier's curves). Closing the stream early stops the model and removes its hooks.
        """
        config = self.config(prompt, seed, steps if steps is not None else self.default_steps,
                             guidance if guidance is not None else self.default_guidance)
        choices = self.resolve_sites(sites)
        run = Run(config, choices)
        readable = self._readable(choices, config.steps, run.notes)
        reader = ProbeReader({t: self.banks[t] for t in readable}, readable) if readable else None
        tracker = self._tracker(config.prompt) if track_classes else None
        model = self._require_model()
        with self._exclusive(), ExitStack() as stack:
            states = sample(model, config, readers=[reader] if reader else [], previews=True)
            stack.callback(states.close)
            for state in states:
                maps = state.readouts.get("probes", {}) if reader else {}
                self._record(run, state.step, state.timestep, state.preview, maps)
                if tracker is not None:
                    run.curves = tracker.update(state.step, state.preview)
                if state.image is not None:
                    run.image = state.image
                    self._finish(run)
                yield self._view(run, state.step, state.image)

    def view_of(self, run: Run, step: Any) -> StepView:
        """Re-draw a stored step of ``run`` (the scrub slider), without model work.

        ``step`` is 0-based like every ``step`` in the code; messages count from 1, as the page does.
        """
        if run is None or not run.previews:
            raise ServiceError("nothing to show yet: generate an image first")
        step = whole_number(step, "step")
        if not 0 <= step < run.num_steps:
            raise ServiceError(f"there is no step {step + 1}: this run has steps 1 to {run.num_steps}")
        return self._view(run, step, run.image if step == run.num_steps - 1 else None)

    def classify(self, run: Run) -> Any:
        """The classifier's per-step curves for a stored run (recomputed from its previews)."""
        if run is None or not run.previews:
            raise ServiceError("nothing to classify yet: generate an image first")
        if self.classifier is None:
            raise ServiceError("no classifier is available for this model (see the notes at the top)")
        from ..classify import classify_run

        with self._exclusive():
            return classify_run(self.classifier, run.previews, run.config.prompt)

    # --- intervention -------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        from ..intervention import available_methods

        return available_methods(self.intervention_banks)

    def require_complete(self, run: Run | None) -> Run:
        """``run`` if it finished; else ServiceError saying there is none or that it was stopped."""
        _require_complete(run)
        return run

    def _editable(self, run: Run | None) -> Run:
        _require_complete(run)
        if run.foreground is None:
            raise ServiceError(
                "the generated image has no foreground mask to move (no labeler and no foreground probe); "
                "draw the target mask instead"
            )
        return run

    def shift_target(self, run: Run | None, dx: Any, dy: Any) -> np.ndarray:
        """The run's object mask moved ``dx`` px right and ``dy`` px down (bool, image size)."""
        from ..intervention import translate_mask

        run = self._editable(run)
        dx, dy = whole_number(dx, "dx"), whole_number(dy, "dy")
        h, w = run.foreground.shape
        limit_x, limit_y = int(w * MAX_SHIFT_FRACTION), int(h * MAX_SHIFT_FRACTION)
        if abs(dx) > limit_x or abs(dy) > limit_y:
            raise ServiceError(f"shift ({dx}, {dy}) is too far: at most {limit_x} px across and {limit_y} px down")
        if not run.foreground.any():
            raise ServiceError("no object was found in the generated image, so there is nothing to move: draw a mask")
        return translate_mask(run.foreground, dx, dy)

    def drawn_target(self, layers: Sequence[Any] | None) -> np.ndarray:
        """A target mask from the editor's drawing layers (strokes = where the object goes).

        ``layers`` are arrays (or PIL images) of the editor canvas; strokes on any layer count.
        Each is read by :func:`~ldm_scene.intervention.mask_values`: by its alpha where the alpha
        says something (strokes on a transparent layer), else by brightness (white on black), so
        an uploaded greyscale, RGB or opaque RGBA mask means what the hint says. Refuses no
        strokes, strokes that cover everything, layers that are not images or are larger than
        :data:`~.inputs.MAX_IMAGE_SIDE` px a side, and layers of different sizes.
        """
        from ..intervention import InterventionError, mask_values, prepare_target

        model = self._require_model()
        if not layers:
            raise InterventionError("the mask is empty: draw where the object should be")
        strength = None
        for layer in layers:
            if layer is None:
                continue
            if isinstance(layer, Image.Image):
                check_image_size(*layer.size, "drawing layer")
                layer = np.asarray(layer)
            if not isinstance(layer, np.ndarray):
                raise InterventionError(f"a drawing layer is a {type(layer).__name__}; expected an image")
            values = mask_values(check_array_image(layer, "drawing layer"))
            if strength is not None and values.shape != strength.shape:
                raise InterventionError(f"drawing layers differ in size: {strength.shape} vs {values.shape}")
            strength = values if strength is None else np.maximum(strength, values)
        if strength is None:
            raise InterventionError("the mask is empty: draw where the object should be")
        return prepare_target(strength, model.image_size)

    def intervene_stream(
        self, run: Run | None, target: np.ndarray, method: str = "steer", strength: Any = 1.0
    ) -> Iterator[InterventionView]:
        """Re-run ``run``'s prompt and seed while editing activations towards ``target``; stream it.

        Yields an :class:`InterventionView` per step (preview with the foreground probe's overlay);
        the last carries a :class:`Comparison` of original, target and result with IoU.
        """
        from ..intervention import METHOD_BANKS, METHODS, InterventionError, default_edit_steps, intervene, make_editor

        model = self._require_model()
        _require_complete(run)
        target = np.asarray(target)
        if target.dtype != bool or target.shape != tuple(model.image_size):
            raise InterventionError(f"target must be a bool mask of {model.image_size}, got {target.dtype} {target.shape}")
        if method not in self.methods:
            choose = f"choose one of {', '.join(self.methods)}"
            if method in METHODS:
                lacking = ", ".join(b for b in METHOD_BANKS[method] if b not in self.intervention_banks)
                raise InterventionError(f"method {method!r} needs the {lacking} probes, which this model's probe "
                                        f"folder lacks; {choose}")
            raise InterventionError(f"unknown method {method!r}; {choose}")
        strength = finite_number(strength, "strength")
        edit_steps = default_edit_steps(run.config.steps, method)
        # Build the editor once up front so a missing probe is reported before any model work.
        make_editor(method, self.intervention_banks, target, None, edit_steps, strength, run.config.seed)
        config = run.config
        edited = Run(config, run.sites, kind=f"intervene:{method}")
        readable = self._readable({"foreground": run.sites["foreground"]} if "foreground" in run.sites else {},
                                  config.steps, edited.notes)
        reader = ProbeReader({"foreground": self.banks["foreground"]}, readable) if readable else None
        with self._exclusive(), ExitStack() as stack:
            if reader is not None:
                # Read the probes around the edited run (hooked before the editor, so they see each
                # site's activation as the UNet made it at that step).
                stack.enter_context(hook_sites(model.unet, reader.sites, _reading(reader), reader.steps,
                                               config.uses_guidance))
            states = intervene(model, config, target, method, self.intervention_banks,
                               steps=edit_steps, strength=strength, previews=True)
            stack.callback(states.close)
            for state in states:
                maps = reader.collect(state.step) if reader else {}
                self._record(edited, state.step, state.timestep, state.preview, maps)
                comparison = None
                if state.image is not None:
                    edited.image = state.image
                    self._finish(edited, emergence_curves=False)
                    comparison = self._compare(run, edited, target, method)
                view = self._view(edited, state.step, state.image)
                yield InterventionView(**vars(view), comparison=comparison)

    def _compare(self, original: Run, edited: Run, target: np.ndarray, method: str) -> Comparison:
        result_mask = edited.foreground if edited.foreground is not None else np.zeros_like(target)
        original_mask = original.foreground if original.foreground is not None else np.zeros_like(target)
        return Comparison(
            original=original.image, target=target, result=edited.image, result_mask=result_mask,
            original_mask=original_mask, iou_target=iou(result_mask, target),
            iou_original_target=iou(original_mask, target), mask_source=edited.foreground_source or "none",
            method=method,
        )

    # --- results ------------------------------------------------------------------------------
    def results(self) -> Results:
        """The probe set's shipped evaluation: a summary table, its README and figures."""
        if self.probe_dir is None or not self.probe_dir.is_dir():
            return Results("No probe set is loaded, so there are no results to show.", [])
        parts = []
        table = _metrics_table(self.metrics)
        if table:
            parts.append("### Best site per task\n\n" + table)
        for name in ("README.md",):
            path = self.probe_dir / name
            if path.is_file():
                parts.append(_strip_images(path.read_text(errors="replace")))
        report = self.model.directory if self.model is not None else None
        if report is not None and (report / "REPORT.md").is_file():
            parts.append("### The toy model\n\n" + _strip_images((report / "REPORT.md").read_text(errors="replace")))
        figures = []
        ordered = ["emergence.png", *[f"heatmap_{t}.png" for t in TASKS]]
        others = sorted(p.name for p in self.probe_dir.glob("*.png") if p.name not in ordered)
        for name in [*ordered, *others]:
            path = self.probe_dir / name
            if path.is_file():
                try:
                    with Image.open(path) as im:
                        figures.append((im.convert("RGB"), name.removesuffix(".png").replace("_", " ")))
                except OSError as err:
                    log.warning("results: cannot read %s: %s", path, err)
        if not parts and not figures:
            parts.append(f"`{self.probe_dir}` has no metrics.json, README.md or figures yet.")
        return Results("\n\n".join(parts), figures)

    # --- internals -----------------------------------------------------------------------------
    def _readable(self, choices: Mapping[str, SiteChoice], steps: int, notes: list[str]) -> dict[str, SiteChoice]:
        readable = {}
        for task, choice in choices.items():
            fit_for = self.banks[task].meta.num_steps
            if fit_for != steps:
                notes.append(f"{task} probes were fit for {fit_for}-step runs; no {task} readout at {steps} steps")
                continue
            readable[task] = choice
        return readable

    def _tracker(self, prompt: str) -> Any:
        if self.classifier is None:
            return None
        from ..classify import CurveTracker

        return CurveTracker(self.classifier, prompt)

    @staticmethod
    def _record(run: Run, step: int, timestep: float, preview: Image.Image, maps: Mapping[str, np.ndarray]) -> None:
        run.previews.append(preview)
        run.timesteps.append(float(timestep))
        run.readouts.append(dict(maps))

    def _finish(self, run: Run, emergence_curves: bool = True) -> None:
        """Find the finished image's object and score every step against the final labels."""
        h, w = self._require_model().image_size
        labels = self._labels(run.image)
        last = run.readouts[-1] if run.readouts else {}
        if labels is not None:
            run.foreground, run.foreground_source = labels["foreground"] > 0.5, "the model's labeler"
            run.reference, run.reference_source = labels, "the labeler's labels of the finished image"
        else:
            if "foreground" in last:
                run.foreground = upsample_nearest(last["foreground"], (h, w)) > 0.5
                run.foreground_source = "the foreground probe at the last step"
            run.reference = {t: upsample_nearest(v, (h, w)) for t, v in last.items()}
            run.reference_source = "the probes' own readout at the last step"
        if emergence_curves and run.reference:
            ref = {t: v for t, v in run.reference.items() if any(t in m for m in run.readouts)}
            run.emergence = emergence(run.readouts, ref)

    def _labels(self, image: Image.Image | None) -> dict[str, np.ndarray] | None:
        if self.labeler is None or image is None:
            return None
        out = self.labeler(np.asarray(image.convert("RGB"))[None])
        return {t: np.asarray(out[t][0]) for t in TASKS if t in out}

    def _view(self, run: Run, step: int, image: Image.Image | None) -> StepView:
        preview = run.previews[step]
        maps = run.readouts[step]
        size = self.display_size
        overlays, heat = {}, None
        for task, values in maps.items():
            if task == "foreground":
                overlays[task] = outline_picture(preview, values, size)
                heat = colour_bar_picture(values, 0.0, 1.0, "viridis", size, "p(object)", "background", "object")
            else:
                cmap, low, high = MAP_STYLE.get(task, ("viridis", "", ""))
                lo, hi = value_range(self.banks[task])
                overlays[task] = colour_bar_picture(values, lo, hi, cmap, size, task, low, high)
        shown = image if image is not None else preview
        return StepView(step, run.config.steps, run.timesteps[step], _enlarge(shown, size),
                        overlays, maps, run, image, heat)

    def display(self, image: Image.Image) -> Image.Image:
        """An image at the UI's display size (pixels kept sharp for small models)."""
        return _enlarge(image, self.display_size)

    def outline(self, image: Image.Image, mask: np.ndarray | None) -> Image.Image:
        """``image`` at display size with ``mask``'s outline drawn on it (the image itself untouched)."""
        return outline_picture(image, None if mask is None else np.asarray(mask, bool), self.display_size)

    def mask_picture(self, mask: np.ndarray, over: Image.Image | None = None) -> Image.Image:
        """A mask drawn for the UI: red over ``over`` (the image it belongs to), or white on black."""
        if over is not None:
            return foreground_overlay(over, mask.astype(np.float32), self.display_size)
        return _enlarge(Image.fromarray((np.asarray(mask) * 255).astype(np.uint8)), self.display_size)


# --- helpers ---------------------------------------------------------------------------------------


def _quoted(words: Sequence[str]) -> str:
    return ", ".join(f"'{w}'" for w in words)


def _require_complete(run: Run | None) -> None:
    if run is None:
        raise ServiceError("generate an image first (Generate tab), then move its object here")
    if not run.complete:
        raise ServiceError(f"the last run was stopped at step {run.num_steps} of {run.config.steps}, before it had "
                           "an image: generate a full run (Generate tab), then move its object here")


def centroid(mask: np.ndarray) -> list[float] | None:
    """The (x, y) centre of a mask's pixels, or None for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return None
    return [round(float(xs.mean()), 2), round(float(ys.mean()), 2)]


def _reading(reader: ProbeReader):
    def fn(site: str, step: int, act: torch.Tensor) -> None:
        reader.read(site, step, act)
        return None

    return fn


def _enlarge(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("RGB")
    if image.size == (size, size):
        return image
    resample = Image.NEAREST if max(image.size) * 2 <= size else Image.BILINEAR
    return image.resize((size, size), resample)


def _load_probes(model: Model, folder: Path) -> tuple[dict[str, ProbeBank], dict[str, ProbeBank], list[str]]:
    """Each probe file on its own: one that does not fit is refused (with the loader's message,
    which names the file) and the others are still used."""
    errors: list[str] = []
    try:
        loaded = load_probe_dir(folder, expect_sites=model.sites(), expect_image_size=model.image_size,
                                tasks=(*TASKS, CLASS_MEANS), expect_model_id=model.model_id, errors=errors,
                                expect_scheduler=model.scheduler_name)
    except Exception as err:  # noqa: BLE001 - Service.load never raises; the folder is untrusted input
        # load_probe_dir turns every refusal it knows into a message; this is the last line for
        # what it does not know, so that a bad file costs the readouts, not the app.
        log.exception("loading probes from %s failed", folder)
        return {}, {}, [f"The probe folder `{folder}` could not be read ({type(err).__name__}: {err}); "
                        "generation works without readouts."]
    refused = [f"A probe file does not fit this model and is not used: {err}" for err in errors]
    banks = {t: b for t, b in loaded.items() if t in TASKS}
    means = {t: loaded[t] for t in ("foreground", CLASS_MEANS) if t in loaded}
    return banks, means, refused


def _load_metrics(folder: Path) -> tuple[dict[str, Any], str | None]:
    path = folder / "metrics.json"
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"`{path}` could not be read ({err}); default sites are used"
    except RecursionError:
        return {}, f"`{path}` is nested too deeply to read; default sites are used"
    if not isinstance(data, dict):
        return {}, f"`{path}` is not a JSON object; default sites are used"
    return data, None


def _load_labeler(model: Model, notes: list[str]) -> Any:
    folder = model.extra_dir("labelers")
    if folder is None or not (folder / "labeler.safetensors").is_file():
        return None
    try:
        from ..toy.nets import ToyLabeler

        return ToyLabeler.load(folder)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        notes.append(f"The labeler in `{folder}` could not be loaded ({err}); masks come from the probes")
        return None


def _load_classifier(model: Model, device: Any, notes: list[str]) -> Any:
    from ..classify import classifier_for

    try:
        return classifier_for(model, device=device)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # ClassifierLoadError is a RuntimeError
        notes.append(f"No classifier for this model, so the Classifier tab shows only the probes: {err}")
        return None


def _task_metrics(metrics: Mapping[str, Any], task: str) -> dict[str, Any]:
    tasks = metrics.get("tasks") if isinstance(metrics, Mapping) else None
    entry = tasks.get(task) if isinstance(tasks, Mapping) else None
    return dict(entry) if isinstance(entry, Mapping) else {}


def _parse_per_step(raw: Any) -> dict[int, str]:
    """``best_per_step`` as ``{step: site}`` from a list (of sites or ``{"site": ...}``) or a dict."""
    items: list[tuple[Any, Any]]
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, (list, tuple)):
        items = []
        for i, entry in enumerate(raw):
            if isinstance(entry, Mapping):
                items.append((entry.get("step", i), entry.get("site")))
            else:
                items.append((i, entry))
    else:
        return {}
    out = {}
    for step, site in items:
        if isinstance(site, Mapping):
            site = site.get("site")
        try:
            step = int(step)
        except (TypeError, ValueError):
            continue
        if isinstance(site, str):
            out[step] = site
    return out


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    """A summary row per task: metric, best site, its test score at the last step, when it got there."""
    tasks = metrics.get("tasks") if isinstance(metrics, Mapping) else None
    if not isinstance(tasks, Mapping) or not tasks:
        return ""
    rows = ["| task | metric | best site | score at the last step | first step at 90% of it |",
            "|---|---|---|---|---|"]
    for task, entry in tasks.items():
        if not isinstance(entry, Mapping):
            continue
        score = entry.get("best_score")
        per_step = entry.get("best_per_step")
        if score is None and isinstance(per_step, (list, tuple)) and per_step:
            score = per_step[-1]
        shown = f"{score:.3f}" if isinstance(score, (int, float)) else "–"
        first = entry.get("first_step_90pct")
        first_shown = f"{first + 1}" if isinstance(first, int) else "–"  # metrics.json counts from 0
        rows.append(f"| {task} | {entry.get('metric', '')} | `{entry.get('best_site', '–')}` | {shown} | {first_shown} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _strip_images(markdown: str) -> str:
    # Relative image links in a shipped README would 404 (the app serves no files); the figures
    # are shown in the gallery instead.
    return re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"*(figure: \1, shown below)*", markdown)
