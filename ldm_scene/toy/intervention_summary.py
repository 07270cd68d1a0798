"""The intervention evaluation's summaries: per-method means, the controls' chance by geometry, the
README table and the examples figure, all from the trials' rows (:mod:`.intervention_eval` runs them)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..intervention import NEEDS_SOURCE, side_by_side
from ..intervention_targets import TARGET_KINDS
from ..reports import markdown_table

#: A result succeeds when its centroid lies within this fraction of the image size of the target's.
SUCCESS_DISTANCE = 0.07
#: Which method each control is the random-direction twin of.
CONTROL_OF = {"random-move": "latent-move", "random-guidance": "readout-guidance", "random-control": "steer"}


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
    if any("background_psnr_outside_objects" in r for r in results):
        out["background_psnr_outside_objects"] = _mean([r.get("background_psnr_outside_objects") for r in results])
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
        "the original and the target masks; beside it, outside the result's object as well (the scene without the "
        "object wherever it landed: an object that lands off its target counts in distance and IoU, not here), "
        "and outside both masks grown by one latent cell (the object's "
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
                  "diffusion; `--keep-background`)"
                  + (", and its final image took the unedited image's pixels outside those cells, feathered over "
                     "one cell beyond them (`KeepBackground.paste_back`)" if summary.get("paste_back") else "") + ".", ""]
    elif "keep_background" in summary:
        lines += ["No method kept the background: each edited run denoised the whole latent (`--no-keep-background`).", ""]
    if summary.get("move_fill"):
        lines += [f"{' and '.join(sorted(NEEDS_SOURCE))} filled the object's old place in the x0 prediction "
                  + ("along rows (each hole cell interpolated between the nearest background cells left and right)"
                     if summary["move_fill"] == "rows" else f"by the {summary['move_fill']} fill") + ".", ""]
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
                     _num(s.get("background_psnr_outside_objects"), ".1f"),
                     _num(s.get("background_psnr_beyond_cell"), ".1f"),
                     _num(s.get("cost_vs_plain"), ".2f") + "x" if s.get("cost_vs_plain") is not None else "—"))
    lines += markdown_table(("method", "success", "object present", "centroid distance (px)", "IoU with target",
                             "IoU with original", "shape kept", "colour kept", "background PSNR (dB)",
                             "outside the result's object too (dB)", "beyond one latent cell (dB)", "cost / plain"),
                            rows)
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
