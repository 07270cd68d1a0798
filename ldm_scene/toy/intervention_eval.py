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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import bundle, metrics
from ..intervention import (
    KEEP_MARGIN, METHOD_DEFAULTS, NEEDS_SOURCE, decoded_locator, keep_background,
    load_intervention_banks, make_editor, mask_image, side_by_side,
)
from ..intervention_methods import guided_sample
from ..intervention_targets import (  # noqa: F401  (re-exported: the evaluation's targets)
    DRAWN_AREA, MIN_SHIFT, NUDGE_FRACTION, SCALE_RANGE, TARGET_KINDS, bounding_box, drawn_target, ellipse_mask,
    make_target, nudge_target, rectangle_mask, scaled_mask, shift_room, shift_target,
)
from ..models import load_model
from ..reports import markdown_table
from ..seeds import TRIAL_SEED0
from ..sampler import config_for, sample
from .nets import ToyClassifier, ToyLabeler
from .quality import has_object, mask_centroid, mask_colour
from .render import scene_from_seed

#: A result succeeds when its centroid lies within this fraction of the image size of the target's.
SUCCESS_DISTANCE = 0.07
#: The evaluated methods, each followed by its random-direction control.
EVAL_METHODS: tuple[str, ...] = ("latent-move", "random-move", "readout-guidance", "random-guidance", "steer",
                                 "random-control", "probe-gradient")
#: Which method each control is the random-direction twin of.
CONTROL_OF = {"random-move": "latent-move", "random-guidance": "readout-guidance", "random-control": "steer"}
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
    """One result's row (see the module docstring) and its labeler mask. ``cell``: the pixels per latent
    cell; given, the row also has the background PSNR outside both masks grown by one cell (what is
    left of the background once the object's shadow and the decoder's spread across a cell are out)."""
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
    if setting.gain is not None:
        for attr in ("strength", "gain", "iterations"):  # steer, readout-guidance, probe-gradient
            if hasattr(editor, attr):
                setattr(editor, attr, type(getattr(editor, attr))(setting.gain))
                break
    if setting.outside is not None and hasattr(editor, "outside"):
        editor.outside = setting.outside
    for name, value in setting.options:
        if not hasattr(editor, name):
            raise ValueError(f"{setting.method} has no setting {name!r}")
        setattr(editor, name, value)
    return editor


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
        self.locate = decoded_locator(self.model, lambda image: self.labeler(image)["mask"][0])

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
        keep = keep_background(original.trajectory, original.mask, target, editor=editor) if keep else None
        states, seconds = _timed(guided_sample(self.model, config, [editor], keep=keep))
        return states[-1].image, seconds, editor


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
    the object's old mask and the target (:func:`~ldm_scene.intervention.keep_background`).
    """
    world = _World(Path(model_dir), scheduler)
    methods = tuple(methods)
    out.mkdir(parents=True, exist_ok=True)
    # The resume key: trials of another model, schedule, guidance or method set are not reused.
    run = {"model": str(model_dir), "steps": steps, "scheduler": world.model.scheduler_name, "methods": list(methods),
           "seed0": TRIAL_SEED0, "keep_background": keep,
           "guidance": config_for(world.model, "a", 0, steps).guidance_text}
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
                   defaults={m: vars(METHOD_DEFAULTS[m]) for m in methods}, keep_background=keep,
                   keep_margin=KEEP_MARGIN if keep else None, **_move_settings(world, methods, steps, keep))
    (out / "intervention.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))
    (out / "README.md").write_text(render_table(summary))
    examples_figure(rows[:N_EXAMPLES], methods, examples_dir, out / "examples.png")
    return summary


def _move_settings(world: _World, methods: Sequence[str], steps: int, keep: bool) -> dict:
    """The move's settings as the trials' editors had them: read off an editor built the same way."""
    moves = [m for m in methods if m in NEEDS_SOURCE]
    if not moves:
        return {"move_keep_margin": None, "move_vacated_margin": None, "move_correct_after": None}
    h, w = world.model.image_size
    mask = np.zeros((h, w), bool)
    mask[: h // 2, : w // 2] = True
    editor = build_editor(Setting(moves[0]), world.banks, np.roll(mask, w // 2, axis=1), steps, 0, mask, world.locate)
    return {"move_keep_margin": editor.keep_margin if keep else None,
            "move_vacated_margin": editor.vacated_margin if keep else None,
            "move_correct_after": editor.correct_after if editor.locate is not None else None}


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


# -- summaries -----------------------------------------------------------------------------------

def landing_chance(distance: float | None, radius: float = SUCCESS_DISTANCE) -> float:
    """The chance that a move by ``distance`` (the object's centroid to the target's, as a fraction of
    the image size) in a uniformly random direction lands within ``radius`` of the target's centroid.

    Landing at angle phi from the target's direction misses it by ``2 distance sin(phi / 2)``, so it
    lands when ``phi <= 2 asin(radius / (2 distance))``: a share ``2 asin(radius / (2 distance)) / pi``
    of the directions (all of them when ``distance <= radius / 2``).
    """
    if distance is None:
        return float("nan")
    if 2 * distance <= radius:
        return 1.0
    return 2 * math.asin(radius / (2 * distance)) / math.pi


def move_chance(distances: Sequence[float | None]) -> float:
    """The mean :func:`landing_chance` over trials: the success rate random-move reaches by geometry alone
    (an upper bound: its shape and colour are not checked here)."""
    return float(np.nanmean([landing_chance(d) for d in distances]))


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise_rows(results: Sequence[dict]) -> dict:
    """The means of a method's per-trial results (distances over the results with an object)."""
    out = {
        "n": len(results),
        "success_rate": _mean([r["success"] for r in results]),
        "object_present": _mean([r["present"] for r in results]),
        "distance_px": _mean([r["distance_px"] for r in results]),
        "iou_target": _mean([r["iou_target"] for r in results]),
        "iou_original": _mean([r["iou_original"] for r in results]),
        "shape_kept": _mean([r["shape_kept"] for r in results]),
        "colour_kept": _mean([r["colour_kept"] for r in results]),
        "background_psnr": _mean([r["background_psnr"] for r in results]),
    }
    if any("background_psnr_beyond_cell" in r for r in results):
        out["background_psnr_beyond_cell"] = _mean([r.get("background_psnr_beyond_cell") for r in results])
    corrected = [r["corrected_px"] for r in results if "corrected_px" in r]
    if corrected:
        lengths = [v for c in corrected for v in c]
        out["corrections"] = {"trials": len(corrected), "corrected": sum(bool(c) for c in corrected),
                              "median_px": float(np.median(lengths)) if lengths else 0.0}
    costs = [r["cost"] for r in results if "cost" in r]
    if costs:
        out["cost_vs_plain"] = float(np.median(costs))
        out["seconds"] = float(np.median([r["seconds"] for r in results]))
    return out


def summarise(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    """Per method (and the unedited baseline): overall, per target kind; plus the control pairs."""
    done = [r for r in rows if "skipped" not in r]
    summary: dict[str, Any] = {"n_trials": len(rows), "n_evaluated": len(done), "success_distance": SUCCESS_DISTANCE,
                               "methods": {}, "by_kind": {}}
    for m in ("unedited", *methods):
        summary["methods"][m] = summarise_rows([r[m] for r in done])
        summary["by_kind"][m] = {k: summarise_rows([r[m] for r in done if r["kind"] == k])["success_rate"]
                                 for k in TARGET_KINDS if any(r["kind"] == k for r in done)}
    summary["kinds"] = {k: sum(r["kind"] == k for r in done) for k in TARGET_KINDS}
    summary["controls"] = {c: m for c, m in CONTROL_OF.items() if c in methods and m in methods}
    if "random-move" in methods and done:
        summary["move_chance"] = move_chance([r["unedited"]["distance"] for r in done])
    if done:
        summary["plain_seconds"] = float(np.median([np.mean(r["plain_seconds"]) for r in done]))
    return summary


def _corrections_text(summary: dict) -> str:
    parts = []
    for m in sorted(NEEDS_SOURCE):
        c = summary["methods"].get(m, {}).get("corrections")
        if c and c.get("trials"):
            parts.append(f"{m}: {c['corrected']} of {c['trials']} trials corrected, by {c['median_px']:.1f} px (median)")
    return f" ({'; '.join(parts)})" if parts else ""


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def render_table(summary: dict) -> str:
    """The README, rendered from the summary (nothing typed by hand)."""
    kinds = ", ".join(f"{n} {k}" for k, n in summary["kinds"].items())
    lines = [
        "# Intervention on the toy model", "",
        "Generated by `python -m ldm_scene.toy intervene-eval` from `intervention.json`; do not edit by hand.", "",
        f"{summary['n_evaluated']} of {summary['n_trials']} trials evaluated (the rest drew no object to move); "
        f"targets: {kinds}. Every image drawn with {summary.get('steps', 15)} steps of "
        f"{summary.get('scheduler', '?')}{', ' + summary['guidance'] if summary.get('guidance') else ''}; prompts "
        "say what the object is, never where. Success: an object whose centroid lies within "
        f"{summary['success_distance']:g} of the image size of the target's, with the unedited image's shape "
        "(shipped classifier) and colour (mean hue in its mask). Distance: between centroids, in pixels, over "
        "results with an object (DragBench's MD). Background PSNR: result against the unedited image, outside "
        "the original and the target masks; beside it, outside both masks grown by one latent cell (the object's "
        "shadow and the decoder's spread across a cell border left out). Cost: median over trials of the edit's time over a plain generation's "
        "timed in the same trial. `unedited` scores the unedited image against the target (the do-nothing "
        "baseline); a `random-*` row is its method's edit along random directions of the same norm (for "
        "`random-move`: the same move, by the same distance, in a random direction, so a short nudge can land "
        "on its target by chance).", "",
    ]
    if summary.get("keep_background"):
        moves = summary.get("move_keep_margin")
        vacated = summary.get("move_vacated_margin")
        also = ("" if moves is None else f" ({', '.join(sorted(NEEDS_SOURCE))}: also where the moved object lands, "
                f"grown by {moves}" + ("" if vacated is None else f", and the old mask grown by {vacated}") + ")")
        lines += [f"Every method, controls included, kept the unedited run's latents outside the object's old mask and "
                  f"the target grown by {summary.get('keep_margin')} latent cell(s){also}, at every step (blended latent "
                  "diffusion; `--keep-background`).", ""]
    elif "keep_background" in summary:
        lines += ["No method kept the background: each edited run denoised the whole latent (`--no-keep-background`).", ""]
    if summary.get("move_correct_after"):
        lines += [f"{' and '.join(sorted(NEEDS_SOURCE))} found the object again {summary['move_correct_after']} steps "
                  "after the move (the shipped labeler on the decoded x0 prediction) and, if it stood off where the move "
                  "sent it, moved it the rest of the way" + _corrections_text(summary) + ".", ""]
    rows = []
    for m, s in summary["methods"].items():
        name = f"{m} (control of {summary['controls'][m]})" if m in summary.get("controls", {}) else m
        rows.append((name, _pct(s["success_rate"]), _pct(s["object_present"]), _num(s["distance_px"], ".1f"),
                     _num(s["iou_target"], ".3f"), _num(s["iou_original"], ".3f"), _pct(s["shape_kept"]),
                     _pct(s["colour_kept"]), _num(s["background_psnr"], ".1f"),
                     _num(s.get("background_psnr_beyond_cell"), ".1f"),
                     _num(s.get("cost_vs_plain"), ".2f") + "x" if s.get("cost_vs_plain") is not None else "—"))
    lines += markdown_table(("method", "success", "object present", "centroid distance (px)", "IoU with target",
                             "IoU with original", "shape kept", "colour kept", "background PSNR (dB)",
                             "beyond one latent cell (dB)", "cost / plain"), rows)
    kinds_done = [k for k in TARGET_KINDS if summary["kinds"].get(k)]
    lines += ["", "Success by target kind:", ""]
    lines += markdown_table(["method"] + [f"{k} ({summary['kinds'][k]})" for k in kinds_done],
                            [[m] + [_pct(by.get(k)) for k in kinds_done] for m, by in summary["by_kind"].items()])
    for control, method in summary.get("controls", {}).items():
        a, b = summary["methods"][method]["success_rate"], summary["methods"][control]["success_rate"]
        if a is not None and b is not None:
            lines += ["", f"{method} over its random-direction control: {a - b:+.0%} success "
                      f"({_pct(a)} against {_pct(b)})."]
    if summary.get("move_chance") is not None:
        lines += ["", f"By geometry alone, a move of the object's distance to the target in a uniformly random direction "
                  f"lands within {summary['success_distance']:g} of the target's centroid in "
                  f"{summary['move_chance']:.1%} of these trials (the mean over trials of 2 asin(r / 2d) / pi, d the "
                  "trial's distance, r the success radius): the rate random-move would reach if every move landed "
                  "exactly and kept shape and colour."]
    if summary.get("plain_seconds"):
        lines += ["", f"A plain generation took {summary['plain_seconds']:.2f} s (median) on this machine."]
    lines += ["", "![examples](examples.png)", ""]
    return "\n".join(lines)


def _outline(image: Image.Image, mask: np.ndarray, scale: int) -> Image.Image:
    """``image`` upscaled with ``mask``'s boundary drawn in magenta."""
    big = np.asarray(image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)).copy()
    m = np.kron(mask.astype(np.uint8), np.ones((scale, scale), np.uint8)).astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    big[m & ~inner] = (255, 0, 255)
    return Image.fromarray(big)


def examples_figure(rows: Sequence[dict], methods: Sequence[str], images: Path, path: Path, scale: int = 2) -> None:
    """One row per kept trial: unedited image, its mask, the target, each method's result (target outlined)."""
    strips = []
    for row in rows:
        if "skipped" in row or not (images / f"{row['seed']}_original.png").exists():
            continue
        load = {name: Image.open(images / f"{row['seed']}_{name}.png") for name in ("original", "original_mask", "target", *methods)}
        target = np.asarray(load["target"]) > 127
        ims = [load["original"], load["original_mask"], _outline(load["target"].convert("RGB"), target, 1)]
        titles = ["unedited", "its mask", f"target: {row['kind']}"]
        for m in methods:
            ims.append(_outline(load[m], target, 1))
            titles.append(f"{m}{' ok' if row[m]['success'] else ''}")
        strips.append(side_by_side(ims, titles, scale=scale))
    if strips:
        grid = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
        y = 0
        for s in strips:
            grid.paste(s, (0, y))
            y += s.height
        grid.save(path)
