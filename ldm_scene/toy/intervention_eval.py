"""Does editing activations put the object where a mask says? Trials on the toy world, per method.

Each trial draws a fresh seed and the renderer's prompt for it ("a red cube": what, never where),
generates the unedited image, finds its object with the shipped labeler, and draws one target
(the kinds take turns, :data:`TARGET_KINDS`):

- ``shift``: the object's mask moved by (dx, dy), both drawn with either sign, at least
  :data:`MIN_SHIFT` of the width in all;
- ``nudge``: the mask moved by :data:`NUDGE_FRACTION` of the width, left, right, up or down;
- ``ellipse`` / ``rectangle``: a region of :data:`DRAWN_AREA` of the image, any aspect in 1:2..2:1,
  at a random centre;
- ``scaled``: the object's own mask scaled by 0.7-1.4 and put at a random centre.

Shifts are drawn so the moved mask's bounding box stays in the frame, so nothing is clipped; a
nudge with no room in any direction (an object spanning the frame) is clipped: what would leave
the frame is dropped. Drawn regions lie in the frame by construction (:mod:`ldm_scene.intervention_targets`).

Every method then regenerates the same prompt and seed with its edit (its default sites, steps
and dose), and the result is judged by the shipped labeler and classifier (:func:`succeeded`):
the object is present, its mask's centroid lies within :data:`SUCCESS_DISTANCE` of the image size
of the target's, and its shape (classifier) and colour (mean hue in its mask) are those of the
unedited image. Also per method: centroid distance in pixels (DragBench's mean distance), IoU
with the target, PSNR of the background outside the original and target masks (result vs
unedited), and the cost per edit as a ratio to a plain generation timed in the same trial, just
before and after the edits (interleaved, so a busy machine slows both alike). Each method's
random-direction control of the same norm runs alongside it, and the unedited image itself is
scored against the target as the do-nothing baseline.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import bundle, metrics
from ..intervention import (
    KEEP_MARGIN, METHOD_DEFAULTS, MOVE_KEEP_MARGIN, NEEDS_SOURCE, keep_background, labeler_locator,
    load_intervention_banks, make_editor, mask_image,
)
from ..intervention_methods import KeepBackground, guided_sample
from ..latent_move import LatentMoveEditor
from ..intervention_targets import (  # noqa: F401  (re-exported: the evaluation's targets)
    DRAWN_AREA, MIN_SHIFT, NUDGE_FRACTION, SCALE_RANGE, TARGET_KINDS, bounding_box, drawn_target, ellipse_mask,
    make_target, nudge_target, rectangle_mask, scaled_mask, shift_room, shift_target,
)
from ..models import load_model
from ..seeds import TRIAL_SEED0
from ..sampler import config_for, sample
from .nets import ToyClassifier, ToyLabeler
from .quality import has_object, mask_centroid, mask_colour
from .render import scene_from_seed
# The summaries, re-exported: callers import the evaluation's whole interface from here.
from .intervention_summary import (  # noqa: F401
    CONTROL_OF, SUCCESS_DISTANCE, examples_figure, landing_chance, move_chance, render_table, summarise,
    summarise_rows, _num, _pct,
)

#: The evaluated methods, each followed by its random-direction control.
EVAL_METHODS: tuple[str, ...] = ("latent-move", "random-move", "readout-guidance", "random-guidance", "steer",
                                 "random-control", "probe-gradient")
#: How many trials keep their images for the figure.
N_EXAMPLES = 6


# -- judging -------------------------------------------------------------------------------------

def centroid_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Distance in pixels between two masks' centroids (None if either is empty)."""
    ca, cb = mask_centroid(a), mask_centroid(b)
    if ca is None or cb is None:
        return None
    h, w = a.shape
    return math.hypot((ca[0] - cb[0]) * w, (ca[1] - cb[1]) * h)


def background_psnr(result: np.ndarray, original: np.ndarray, *masks: np.ndarray) -> float:
    """PSNR (dB, peak 255) of ``result`` against ``original`` over the pixels outside every mask.

    Inf where they agree exactly there; nan if the masks cover the whole image.
    """
    keep = ~np.logical_or.reduce([np.asarray(m, bool) for m in masks])
    if not keep.any():
        return math.nan
    diff = np.asarray(result, np.float64)[keep] - np.asarray(original, np.float64)[keep]
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def succeeded(present: bool, distance: float | None, same_shape: bool, same_colour: bool,
              limit: float = SUCCESS_DISTANCE) -> bool:
    """The success rule: an object, its centroid within ``limit`` (a fraction of the image size)
    of the target's, with the unedited image's shape and colour."""
    return bool(present and distance is not None and distance <= limit and same_shape and same_colour)


@dataclass
class Original:
    """The unedited generation of a trial, as the judges see it."""

    image: Image.Image
    mask: np.ndarray
    shape: str
    colour: str | None
    seconds: float
    #: The unedited run's latent after each step (what an edit that keeps the background holds).
    trajectory: Sequence[torch.Tensor] = ()


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` in every direction (a square neighbourhood)."""
    from scipy.ndimage import maximum_filter

    return maximum_filter(np.asarray(mask, bool), size=2 * pixels + 1) if pixels > 0 else np.asarray(mask, bool)


def judge(image: Image.Image, original: Original, target: np.ndarray, labeler: ToyLabeler,
          classifier: ToyClassifier, cell: int | None = None) -> tuple[dict, np.ndarray]:
    """One result's row (see the module docstring) and its labeler mask. The background PSNR is outside the
    original and target masks (the issue's measure) and, beside it, outside the result's object mask too
    (the scene without the object wherever it landed). ``cell``: the pixels per latent cell; given, the
    row also has the background PSNR outside both masks grown by one cell (what is left of the background
    once the object's shadow and the decoder's spread across a cell are out)."""
    arr = np.asarray(image)
    mask = labeler(arr)["mask"][0]
    present = has_object(mask)
    distance_px = centroid_distance(mask, target) if present else None
    size = max(mask.shape)
    distance = None if distance_px is None else distance_px / size
    shape, colour = classifier.name(arr), mask_colour(arr, mask)
    row = {
        "present": present, "distance_px": distance_px, "distance": distance,
        "iou_target": metrics.iou(mask, target), "iou_original": metrics.iou(mask, original.mask),
        "background_psnr": _finite(background_psnr(arr, np.asarray(original.image), original.mask, target)),
        "shape_kept": shape == original.shape, "colour_kept": colour == original.colour,
    }
    # the scene proper: also outside where the result's object is, so an object that lands off its target
    # counts against distance and IoU, not as damaged background
    row["background_psnr_outside_objects"] = _finite(background_psnr(arr, np.asarray(original.image), original.mask,
                                                                     target, mask))
    if cell:
        row["background_psnr_beyond_cell"] = _finite(background_psnr(
            arr, np.asarray(original.image), grown(original.mask, cell), grown(target, cell)))
    row["success"] = succeeded(present, distance, row["shape_kept"], row["colour_kept"])
    return row, mask


# -- running -------------------------------------------------------------------------------------

def _final(states) -> Image.Image:
    return [s.image for s in states][-1]


def _timed(states) -> tuple[list, float]:
    """Every step of a generation (the last carries the image) and the seconds it took."""
    t0 = time.perf_counter()
    done = list(states)
    return done, time.perf_counter() - t0


@dataclass(frozen=True)
class Setting:
    """Where and how hard one method edits (a row of the sweep); None keeps the method's default."""

    method: str
    sites: str | None = None
    steps_fraction: float | None = None
    gain: float | None = None
    outside: float | None = None
    #: Other editor attributes to set, as (name, value) pairs (e.g. readout-guidance's ``layout_grid``).
    options: tuple[tuple[str, Any], ...] = ()


def build_editor(setting: Setting, banks: dict, target: np.ndarray, steps: int, seed: int,
                 source: np.ndarray | None = None, locate: Any = None):
    """The editor for ``setting``: the method's defaults (:data:`METHOD_DEFAULTS`) where it says None.
    ``source``: the object's mask in the unedited image (what a move carries); ``locate``: how a
    move finds the object again to correct itself."""
    from ..sites import SITE_KEYS, UP_SITE_KEYS

    d = METHOD_DEFAULTS[setting.method]
    sites = None
    if setting.sites not in (None, "none"):  # "none": a method that edits no site (latent-move)
        sites = UP_SITE_KEYS if setting.sites == "up" else SITE_KEYS
    fraction = d.steps_fraction if setting.steps_fraction is None else setting.steps_fraction
    if d.single_step:
        edit_steps = (min(steps - 1, round(steps * fraction)),)
    else:
        edit_steps = tuple(range(max(1, round(steps * fraction))))
    if sites is not None:
        bank = next(iter(banks.values()))
        sites = tuple(s for s in sites if s in bank.meta.sites)
    editor = make_editor(setting.method, banks, target, sites, edit_steps, 1.0, seed, source, locate)
    overrides: dict[str, Any] = {}
    if setting.gain is not None:
        # steer and latent-move, readout-guidance, probe-gradient
        attr = next((a for a in ("strength", "gain", "iterations") if hasattr(editor, a)), None)
        if attr is not None:
            overrides[attr] = type(getattr(editor, attr))(setting.gain)
    if setting.outside is not None and hasattr(editor, "outside"):
        overrides["outside"] = setting.outside
    for name, value in setting.options:
        if not hasattr(editor, name):
            raise ValueError(f"{setting.method} has no setting {name!r}")
        overrides[name] = value
    # Every editor is a dataclass: built anew, its own checks and what it derives (a move's
    # displacement from its strength) see the setting.
    return replace(editor, **overrides) if overrides else editor


class _World:
    """The model, its probes and the judges, loaded once."""

    def __init__(self, model_dir: Path, scheduler: type | None = None):
        torch.set_num_threads(1)
        self.model = load_model(str(model_dir), device="cpu")
        if scheduler is not None:
            self.model.pipe.scheduler = scheduler.from_config(self.model.pipe.scheduler.config)
        self.banks = load_intervention_banks(bundle.probes_dir(model_dir), expect_sites=self.model.sites())
        self.labeler = ToyLabeler.load(bundle.labelers_dir(model_dir))
        self.classifier = ToyClassifier.load(bundle.labelers_dir(model_dir))
        self.cell = self.model.vae_scale_factor  # pixels per latent cell
        # A move's correction finds the object with the same labeler the app uses.
        self.locate = labeler_locator(self.model, self.labeler)

    def original(self, seed: int, steps: int):
        config = config_for(self.model, scene_from_seed(seed).prompt, seed, steps)
        states, seconds = _timed(sample(self.model, config))
        image = states[-1].image
        arr = np.asarray(image)
        mask = self.labeler(arr)["mask"][0]
        return config, Original(image, mask, self.classifier.name(arr), mask_colour(arr, mask), seconds,
                                [s.latent for s in states])

    def edit(self, config, setting: Setting, target: np.ndarray, steps: int, original: Original, keep: bool = True):
        """The edited image of ``original``'s run; with ``keep`` every method, controls included, keeps
        the unedited run's latents outside the object's old mask and the target (and, for a move,
        where the object lands)."""
        editor = build_editor(setting, self.banks, target, steps, config.seed, original.mask, self.locate)
        keep = (keep_background(original.trajectory, original.mask, target, editor=editor, image=original.image)
                if keep else None)
        states, seconds = _timed(guided_sample(self.model, config, [editor], keep=keep))
        return states[-1].image, seconds, editor


def editor_defaults(cls: type) -> dict:
    """A dataclass editor's plain (number, string, bool) field defaults: what its trials ran with
    unless a setting says otherwise."""
    return {f.name: f.default for f in fields(cls)
            if f.default is not MISSING and isinstance(f.default, (int, float, str, bool))}


def _trial_target(seed: int, index: int, mask: np.ndarray) -> tuple[str, np.ndarray, dict]:
    kind = TARGET_KINDS[index % len(TARGET_KINDS)]
    target, params = make_target(kind, mask, np.random.default_rng(seed))
    return kind, target, params


def run_trials(model_dir: Path, n: int, out: Path, methods: Sequence[str] = EVAL_METHODS, steps: int = 15,
               scheduler: type | None = None, resume: bool = True, keep: bool = True) -> dict:
    """Run ``n`` trials and write ``intervention.json``, ``README.md`` and ``examples.png`` into ``out``.

    Each finished trial is appended to ``out/trials.jsonl`` at once; with ``resume``, a rerun with
    the same model, steps, scheduler, methods and ``keep`` skips the trials already there.
    ``scheduler`` (a diffusers scheduler class) replaces the model's own for every generation of
    the trials. ``keep``: every method (controls included) keeps the unedited run's latents outside
    the object's old mask and the target (:func:`~ldm_scene.intervention.keep_background`) and pastes
    the unedited image back there on its final image.
    """
    world = _World(Path(model_dir), scheduler)
    methods = tuple(methods)
    out.mkdir(parents=True, exist_ok=True)
    # The resume key: trials of another model, schedule, guidance, method set or method settings are not reused.
    run = {"model": str(model_dir), "steps": steps, "scheduler": world.model.scheduler_name, "methods": list(methods),
           "seed0": TRIAL_SEED0, "keep_background": keep,
           "guidance": config_for(world.model, "a", 0, steps).guidance_text,
           "defaults": {m: vars(METHOD_DEFAULTS[m]) for m in methods},
           "move_defaults": editor_defaults(LatentMoveEditor), "keep_margin": KEEP_MARGIN,
           "move_keep_margin": MOVE_KEEP_MARGIN, "paste_back_feather": KeepBackground.feather}
    log, header = out / "trials.jsonl", out / "run.json"
    done: dict[int, dict] = {}
    if resume and log.exists() and header.exists() and json.loads(header.read_text()) == run:
        for line in log.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["seed"]] = row
    else:
        log.write_text("")
        header.write_text(json.dumps(run))
    examples_dir = out / "examples"
    examples_dir.mkdir(exist_ok=True)
    todo = [i for i in range(n) if TRIAL_SEED0 + i not in done]
    with tqdm(total=n, initial=n - len(todo), desc="intervention trials") as bar:
        for i in todo:
            seed = TRIAL_SEED0 + i
            row = _one_trial(world, seed, i, methods, steps, examples_dir if i < N_EXAMPLES else None, keep)
            done[seed] = row
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
    rows = [done[TRIAL_SEED0 + i] for i in range(n)]
    summary = summarise(rows, methods)
    summary.update(scheduler=world.model.scheduler_name, steps=steps, guidance=run["guidance"],
                   defaults=run["defaults"], keep_background=keep, paste_back=keep,
                   keep_margin=KEEP_MARGIN if keep else None, **_move_settings(rows, methods))
    (out / "intervention.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))
    (out / "README.md").write_text(render_table(summary))
    examples_figure(rows[:N_EXAMPLES], methods, examples_dir, out / "examples.png")
    return summary


def move_settings(editor: Any, keep: bool) -> dict:
    """The settings a move's editor ran with, as a trial records them: the background it frees (with
    ``keep``), its correction (None without a ``locate``) and how it fills the object's old place."""
    return {"keep_margin": editor.keep_margin if keep else None,
            "vacated_margin": editor.vacated_margin if keep else None,
            "correct_after": editor.correct_after if editor.locate is not None else None,
            "fill": editor.fill}


def _move_settings(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    """The summary's ``move_*`` fields: the settings the trials' move editors recorded (the first
    trial that ran a move; every trial of one run builds its editors alike); None without a move."""
    for row in rows:
        for m in methods:
            settings = row.get(m, {}).get("move") if m in NEEDS_SOURCE else None
            if settings is not None:
                return {f"move_{k}": v for k, v in settings.items()}
    return {"move_keep_margin": None, "move_vacated_margin": None, "move_correct_after": None, "move_fill": None}


def _one_trial(world: _World, seed: int, index: int, methods: Sequence[str], steps: int,
               keep_images: Path | None, keep: bool = True) -> dict:
    config, original = world.original(seed, steps)
    row: dict[str, Any] = {"seed": seed, "prompt": config.prompt}
    if not has_object(original.mask):
        return {**row, "skipped": "no object in the unedited image"}
    kind, target, params = _trial_target(seed, index, original.mask)
    row.update(kind=kind, target=params, target_area=float(target.mean()), original_shape=original.shape,
               original_colour=original.colour)
    unedited, _ = judge(original.image, original, target, world.labeler, world.classifier, world.cell)
    row["unedited"] = unedited
    images = {"original": original.image, "original_mask": mask_image(original.mask), "target": mask_image(target)}
    # Interleaved timing: plain generations just before (the original) and after the edits, and the
    # methods in an order that rotates from trial to trial.
    order = [methods[(index + k) % len(methods)] for k in range(len(methods))]
    for method in order:
        image, seconds, editor = world.edit(config, Setting(method), target, steps, original, keep)
        result, _ = judge(image, original, target, world.labeler, world.classifier, world.cell)
        result["seconds"] = seconds
        losses = getattr(editor, "losses", None)
        if losses:
            result["readout_loss"] = [float(v) for _, v in losses]
        if method in NEEDS_SOURCE:
            result["move"] = move_settings(editor, keep)
        corrections = getattr(editor, "corrections", None)
        if corrections is not None and getattr(editor, "locate", None) is not None:
            result["corrected_px"] = [math.hypot(dx, dy) for _, dx, dy in corrections]
        if getattr(editor, "agreement", None):
            result["probe_agreement_before"] = float(np.mean([a[2] for a in editor.agreement]))
            result["probe_agreement_after"] = float(np.mean([a[3] for a in editor.agreement]))
        row[method] = result
        images[method] = image
    _, after = _timed(sample(world.model, config))
    row["plain_seconds"] = [original.seconds, after]
    plain = (original.seconds + after) / 2
    for method in methods:
        row[method]["cost"] = row[method]["seconds"] / plain
    if keep_images is not None:
        for name, im in images.items():
            im.save(keep_images / f"{seed}_{name}.png")
    return row
