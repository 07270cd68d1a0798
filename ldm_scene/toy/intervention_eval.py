"""Does editing activations move the object? Trials on the toy world, per intervention method.

Each trial draws a fresh prompt and seed, generates the original image, finds its foreground with
the shipped labeler, and shifts that mask sideways by 25-40% of the image width (towards the side
with more room) as the target. Every method then regenerates the same prompt and seed with its
edit, and the result's foreground (same labeler) is compared with the target and the original.
A trial succeeds when the result overlaps the target more than the original and IoU > 0.5.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import metrics
from ..intervention import (
    METHODS, default_edit_steps, load_intervention_banks, make_editor, mask_image, side_by_side, translate_mask,
)
from ..models import load_model
from ..sampler import config_for, sample
from .nets import ToyClassifier, ToyLabeler
from .quality import has_object, mask_colour, parse_prompt
from .render import scene_from_seed

#: Trial seeds start here: unused by training, held-out renders, probes and the report.
TRIAL_SEED0 = 30_000_000
#: The sweep that chose steer's defaults draws its trials here, apart from the evaluation's.
SWEEP_SEED0 = 40_000_000

#: (sites, fraction of steps edited, gain, outside share) of steer tried by ``intervene-sweep``; the
#: first is the one-token projection at the paper's sites and steps.
SWEEP_GRID: tuple[tuple[str, float, float, float], ...] = (
    ("up", 1 / 3, 1.0, 1.0), ("up", 1 / 3, 15.0, 1.0), ("all", 1 / 3, 15.0, 1.0),
    ("all", 2 / 3, 5.0, 1.0), ("all", 2 / 3, 15.0, 1.0), ("all", 2 / 3, 30.0, 1.0),
    ("all", 2 / 3, 15.0, 0.3), ("all", 2 / 3, 30.0, 0.3), ("all", 2 / 3, 10.0, 0.3), ("all", 1 / 2, 15.0, 0.3),
    ("up", 2 / 3, 15.0, 0.3), ("up", 1 / 2, 20.0, 0.2), ("all", 1 / 2, 20.0, 0.2),
    ("up", 1.0, 5.0, 0.3), ("up", 1.0, 8.0, 0.3),
)


def succeeded(iou_target: float, iou_original: float) -> bool:
    """A trial's success: the result overlaps the target more than the original, and by IoU > 0.5."""
    return bool(iou_target > iou_original and iou_target > 0.5)


def trial_target(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Shift ``mask`` by 25-40% of the width towards the side with more room."""
    w = mask.shape[1]
    col = np.nonzero(mask)[1].mean() / w
    dx = int(round(rng.uniform(0.25, 0.40) * w)) * (1 if col < 0.5 else -1)
    return translate_mask(mask, dx, 0), dx


def _trials(model, labeler, seed0: int, n: int, steps: int):
    """Up to ``n`` (config, original image, original mask, target, dx) with an object to move."""
    rng = np.random.default_rng(0)
    for i in range(n):
        seed = seed0 + i
        config = config_for(model, scene_from_seed(seed).prompt, seed, steps)
        t0 = time.perf_counter()
        original = [s.image for s in sample(model, config, previews=False)][-1]
        seconds = time.perf_counter() - t0
        before = labeler(np.asarray(original))["mask"][0]
        if not has_object(before):
            yield config, original, before, None, 0, seconds
            continue
        target, dx = trial_target(before, rng)
        yield config, original, before, target, dx, seconds


def run_sweep(model_dir: Path, n: int, out: Path, grid=SWEEP_GRID, steps: int = 15) -> list[dict]:
    """Success of steer per (sites, steps fraction, gain) on trials drawn from :data:`SWEEP_SEED0`.

    This is how steer's defaults were chosen; its seeds are disjoint from :func:`run_trials`'s,
    so the evaluation does not measure the settings on the trials that chose them.
    """
    from ..sites import SITE_KEYS, UP_SITE_KEYS

    torch.set_num_threads(1)
    model = load_model(str(model_dir), device="cpu")
    banks = load_intervention_banks(model_dir / "probes", expect_sites=model.sites())
    labeler = ToyLabeler.load(model_dir / "labelers")
    classifier = ToyClassifier.load(model_dir / "labelers")
    trials = [t for t in tqdm(_trials(model, labeler, SWEEP_SEED0, n, steps), total=n, desc="sweep originals")
              if t[3] is not None]
    # Kept: the same shape as the unedited image of the seed (as in run_trials); prompted: the prompt's.
    shapes_before = {t[0].seed: classifier.name(t[1]) for t in trials}
    rows = []
    for sites_name, fraction, gain, outside in tqdm(grid, desc="sweep settings"):
        sites = UP_SITE_KEYS if sites_name == "up" else SITE_KEYS
        edit_steps = tuple(range(max(1, round(steps * fraction))))
        results = []
        for config, _, before, target, _, _ in trials:
            editor = make_editor("steer", banks, target, sites, edit_steps, 1.0, config.seed)
            editor.strength, editor.outside = gain, outside
            edited = [s.image for s in sample(model, config, editors=[editor], previews=False)][-1]
            after = labeler(np.asarray(edited))["mask"][0]
            iou_t, iou_o = metrics.iou(after, target), metrics.iou(after, before)
            shape = classifier.name(edited)
            results.append((iou_t, iou_o, succeeded(iou_t, iou_o), has_object(after),
                            shape == shapes_before[config.seed], shape == parse_prompt(config.prompt).shape))
        r = np.asarray(results, dtype=float).mean(0)
        rows.append({"method": "steer", "sites": sites_name, "steps_fraction": fraction, "gain": gain, "outside": outside,
                     "n": len(results), "guidance": trials[0][0].guidance_text if trials else None,
                     "iou_target": r[0], "iou_original": r[1], "success_rate": r[2], "object_present": r[3],
                     "shape_kept": r[4], "shape_prompted": r[5]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    text = render_sweep(rows, steps)
    (out / "sweep.md").write_text(text)
    print(text)
    return rows


def render_sweep(rows: list[dict], steps: int = 15) -> str:
    """sweep.md from sweep.json's rows (nothing typed by hand); the shipped default is marked."""
    from ..intervention import METHOD_DEFAULTS

    lines = ["# Steer settings on the toy model", "",
             f"`python -m ldm_scene.toy intervene-sweep`: {rows[0]['n'] if rows else 0} trials with seeds from {SWEEP_SEED0:,} "
             f"(the evaluation's start at {TRIAL_SEED0:,}), {steps} steps"
             f"{', ' + rows[0]['guidance'] if rows and rows[0].get('guidance') else ''}. Success as in the evaluation; shape kept: the "
             "classifier names the same shape as in the unedited image; shape prompted: the prompt's. * marks steer's default.", "",
             "| sites | steps edited | gain | outside share | trials | success | IoU target | IoU original | object present "
             "| shape kept | shape prompted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    d = METHOD_DEFAULTS["steer"]
    for r in rows:
        star = " *" if (r["sites"], round(r["steps_fraction"], 4), r["gain"], r["outside"]) == (
            d.sites, round(d.steps_fraction, 4), d.gain, d.outside) else ""
        edited = "all" if r["steps_fraction"] >= 1 else f"first {r['steps_fraction']:.2f}"
        lines.append(f"| {r['sites']}{star} | {edited} | {r['gain']:g} | {r['outside']:g} | {r['n']} "
                     f"| {r['success_rate']:.0%} | {r['iou_target']:.3f} | {r['iou_original']:.3f} | {r['object_present']:.0%} "
                     f"| {r.get('shape_kept', float('nan')):.0%} | {r.get('shape_prompted', float('nan')):.0%} |")
    return "\n".join(lines) + "\n"


def run_trials(model_dir: Path, n: int, out: Path, methods=METHODS, steps: int = 15,
               scheduler: type | None = None) -> dict:
    """Run ``n`` trials and write ``intervention.json``, ``README.md`` and figures into ``out``.

    ``scheduler`` (a diffusers scheduler class) replaces the model's own for every generation of
    the trials, originals included (e.g. the paper's LMS, to compare with the toy model's Euler).
    """
    torch.set_num_threads(1)
    model = load_model(str(model_dir), device="cpu")
    if scheduler is not None:
        model.pipe.scheduler = scheduler.from_config(model.pipe.scheduler.config)
    banks = load_intervention_banks(model_dir / "probes", expect_sites=model.sites())
    labeler = ToyLabeler.load(model_dir / "labelers")
    classifier = ToyClassifier.load(model_dir / "labelers")
    rows_of = tuple(methods)
    rows, examples, seconds = [], [], {m: [] for m in ("plain", *rows_of)}
    for config, original, before, target, dx, plain_s in tqdm(_trials(model, labeler, TRIAL_SEED0, n, steps),
                                                              total=n, desc="intervention trials"):
        seconds["plain"].append(plain_s)
        seed, prompt = config.seed, config.prompt
        words = parse_prompt(prompt)
        if target is None:
            rows.append({"seed": seed, "prompt": prompt, "skipped": "no object in the original"})
            continue
        orig_arr = np.asarray(original)
        orig_shape = classifier.name(orig_arr)
        orig_colour = mask_colour(orig_arr, before)
        row = {"seed": seed, "prompt": prompt, "dx": dx, "original_shape": orig_shape, "original_colour": orig_colour}
        results = {}
        for method in rows_of:
            t0 = time.perf_counter()
            editor = make_editor(method, banks, target, None, default_edit_steps(steps, method), 1.0, seed)
            edited = [s.image for s in sample(model, config, editors=[editor], previews=False)][-1]
            seconds[method].append(time.perf_counter() - t0)
            arr = np.asarray(edited)
            after = labeler(arr)["mask"][0]
            iou_t, iou_o = metrics.iou(after, target), metrics.iou(after, before)
            shape = classifier.name(arr)
            colour = mask_colour(arr, after)
            row[method] = {
                "iou_target": iou_t, "iou_original": iou_o, "success": succeeded(iou_t, iou_o),
                "present": has_object(after),
                # Kept: the same shape/colour as the unedited image of this seed (the model itself
                # does not always draw the prompted ones); prompted: as the prompt says.
                "shape_kept": shape == orig_shape, "colour_kept": colour == orig_colour,
                "shape_prompted": shape == words.shape, "colour_prompted": colour == words.colour,
            }
            if getattr(editor, "agreement", None):
                # Did the optimisation reach its objective? (the probe reads the target at the edited sites)
                row[method]["probe_agreement_before"] = float(np.mean([a[2] for a in editor.agreement]))
                row[method]["probe_agreement_after"] = float(np.mean([a[3] for a in editor.agreement]))
            results[method] = (edited, after)
        rows.append(row)
        if len(examples) < 6:
            examples.append((original, before, target, results))
    summary = summarise(rows, rows_of, seconds)
    summary["scheduler"], summary["steps"] = model.scheduler_name, steps
    summary["guidance"] = config_for(model, "a", 0, steps).guidance_text
    out.mkdir(parents=True, exist_ok=True)
    (out / "intervention.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))
    (out / "README.md").write_text(render_table(summary))
    _figures(examples, summary, rows_of, out)
    return summary


def summarise(rows: list[dict], methods, seconds: dict) -> dict:
    done = [r for r in rows if "skipped" not in r]
    summary = {"n_trials": len(rows), "n_evaluated": len(done), "methods": {}}
    for m in methods:
        vals = [r[m] for r in done]
        summary["methods"][m] = {
            "success_rate": float(np.mean([v["success"] for v in vals])),
            "iou_target": float(np.mean([v["iou_target"] for v in vals])),
            "iou_original": float(np.mean([v["iou_original"] for v in vals])),
            "object_present": float(np.mean([v["present"] for v in vals])),
            "shape_kept": float(np.mean([v["shape_kept"] for v in vals])),
            "colour_kept": float(np.mean([v["colour_kept"] for v in vals])),
            "shape_prompted": float(np.mean([v["shape_prompted"] for v in vals])),
            **({k: float(np.mean([v[k] for v in vals])) for k in ("probe_agreement_before", "probe_agreement_after")
                if vals and k in vals[0]}),
            "colour_prompted": float(np.mean([v["colour_prompted"] for v in vals])),
            "seconds": float(np.median(seconds[m])),
            "cost_vs_plain": float(np.median(seconds[m]) / np.median(seconds["plain"])),
        }
    # The model does not always draw what it is asked for; an edit of a malformed original is a
    # harder case, so success is also given for the trials whose original shows the prompted shape.
    well_formed = [r for r in done if r["original_shape"] == parse_prompt(r["prompt"]).shape]
    summary["n_well_formed"] = len(well_formed)
    for m in methods:
        summary["methods"][m]["well_formed"] = {
            k: (float(np.mean([r[m][v] for r in well_formed])) if well_formed else None)
            for k, v in (("success_rate", "success"), ("shape_kept", "shape_kept"), ("object_present", "present"))
        }
    if "random-control" in methods:
        # A control success can mean the object's place was fragile in that seed: how many of the
        # control's successes each method shares says how much of its own rate that explains.
        control = [r for r in done if r["random-control"]["success"]]
        summary["control_successes"] = len(control)
        summary["shared_with_control"] = {m: int(sum(r[m]["success"] for r in control)) for m in methods if m != "random-control"}
    summary["plain_seconds"] = float(np.median(seconds["plain"]))
    summary["original_shape_prompted"] = float(np.mean([r["original_shape"] == parse_prompt(r["prompt"]).shape for r in done]))
    summary["original_colour_prompted"] = float(np.mean([r["original_colour"] == parse_prompt(r["prompt"]).colour for r in done]))
    return summary


def render_table(summary: dict) -> str:
    """The README table, rendered from the summary (nothing typed by hand)."""
    lines = [
        "# Intervention on the toy model", "",
        f"{summary['n_evaluated']} of {summary['n_trials']} trials evaluated (the rest drew no object to move), "
        f"every image drawn with {summary.get('steps', 15)} steps of {summary.get('scheduler', 'LMSDiscreteScheduler')}"
        f"{', ' + summary['guidance'] if summary.get('guidance') else ''}. "
        "Target: the original foreground shifted sideways by 25-40% of the width. Success: IoU(result, target) > "
        "IoU(result, original) and > 0.5. Masks and shapes judged by the shipped labeler and classifier. "
        "Kept: the same shape (colour) as the unedited image of the seed; prompted: the prompt's. "
        f"Unedited images show the prompted shape in {summary['original_shape_prompted']:.0%} and the prompted "
        f"colour in {summary['original_colour_prompted']:.0%} of these trials.", "",
        "| method | success | IoU with target | IoU with original | object present | shape kept | colour kept "
        "| shape prompted | colour prompted | time / plain generation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary["methods"].items():
        lines.append(
            f"| {m} | {s['success_rate']:.0%} | {s['iou_target']:.3f} | {s['iou_original']:.3f} | {s['object_present']:.0%} "
            f"| {s['shape_kept']:.0%} | {s['colour_kept']:.0%} | {s['shape_prompted']:.0%} | {s['colour_prompted']:.0%} "
            f"| {s['cost_vs_plain']:.2f}x |"
        )
    if summary.get("n_well_formed"):
        lines += ["", f"The {summary['n_well_formed']} trials whose unedited image shows the prompted shape (classifier):", "",
                  "| method | success | shape kept | object present |", "|---|---|---|---|"]
        for m, s in summary["methods"].items():
            w = s["well_formed"]
            lines.append(f"| {m} | {w['success_rate']:.0%} | {w['shape_kept']:.0%} | {w['object_present']:.0%} |")
    for m, s in summary["methods"].items():
        if "probe_agreement_after" in s:
            lines += ["", f"{m}: at the edited sites and steps the foreground probe agreed with the target on "
                      f"{s['probe_agreement_before']:.0%} of tokens before the edit and {s['probe_agreement_after']:.0%} after "
                      "it (the optimisation's own objective), averaged over trials."]
    if summary.get("control_successes"):
        shared = ", ".join(f"{m} {k}" for m, k in summary["shared_with_control"].items())
        lines += ["", f"The random control succeeded in {summary['control_successes']} trials; of those, the other methods also "
                  f"succeeded in: {shared}. A push with the target's layout moves an object whose place is still open, "
                  "whatever its direction; the margin over the control is what the direction adds."]
    lines += ["", "![examples](examples.png)", ""]
    return "\n".join(lines)


def _figures(examples: list, summary: dict, methods, out: Path) -> None:
    rows = []
    for original, before, target, results in examples:
        ims = [original, mask_image(before), mask_image(target)]
        titles = ["original", "mask", "target"]
        for m in methods:
            ims += [results[m][0]]
            titles += [m]
        rows.append(side_by_side(ims, titles, scale=2))
    if rows:
        from PIL import Image

        grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
        y = 0
        for r in rows:
            grid.paste(r, (0, y))
            y += r.height
        grid.save(out / "examples.png")
