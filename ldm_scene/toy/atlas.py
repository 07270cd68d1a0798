"""Decodability versus causality: where the probe reads the object, and where an edit moves it.

For each self-attention site and each window of denoising steps, two numbers side by side:

- **decodability**: the foreground probe's test Dice at that (site, step), averaged over the window,
  from the probe evaluation's ``metrics.json`` (no new measurement);
- **causality**: how far an edit at that site alone, in that window alone, moves the object toward
  a shifted copy of its own mask: the share of the centroid's distance to the target that the edit
  closes, ``(d_before - d_after) / d_before``, averaged over trials (0: nothing moved, 1: it arrived;
  negative: it went the other way or vanished, scored as not moved closer).

The edit is ``steer`` (the probe's class-mean direction, the method's own gain and outside share);
the same edit along a random direction of the same norm (``random-control``) at the same site and
window is the control. Trials draw fresh seeds from :data:`~ldm_scene.seeds.ATLAS_SEED0` and shift
each object by 30% of the width toward the image's far side.

``ldm-scene toy atlas`` writes ``atlas.json``, ``atlas.md`` and ``atlas.png`` (two heat maps,
sites x windows) into the model's ``intervention/`` folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .. import bundle
from ..intervention import make_editor, translate_mask
from ..intervention_methods import guided_sample
from ..figures import atlas_figure, save_figure
from ..reports import markdown_table
from ..seeds import ATLAS_SEED0
from ..sites import SITE_KEYS, short_site_name
from .intervention_eval import _World, _final, centroid_distance
from .quality import has_object, mask_centroid

#: Step windows (0-based loop indices, end exclusive) of a 15-step run: early, middle, late.
WINDOWS: tuple[tuple[int, int], ...] = ((0, 5), (5, 10), (10, 15))
SHIFT_SHARE = 0.3


def closed_share(before: float, after: float | None) -> float:
    """Share of the centroid distance ``before`` that an edit closed; a vanished object closes none."""
    if after is None or before <= 0:
        return 0.0
    return float((before - after) / before)


def shift_target(mask: np.ndarray, share: float = SHIFT_SHARE) -> np.ndarray:
    """The mask moved by ``share`` of the width toward the side with more room."""
    cx, _ = mask_centroid(mask)
    w = mask.shape[1]
    dx = int(round(share * w)) * (1 if cx < 0.5 else -1)
    return translate_mask(mask, dx, 0)


def _distance(mask: np.ndarray, target: np.ndarray) -> float | None:
    """Centroid distance (pixels) from a labeled mask to the target; None where no object was drawn."""
    return centroid_distance(mask, target) if has_object(mask) else None


def run_atlas(model_dir: Path, n: int, out: Path, windows: Sequence[tuple[int, int]] = WINDOWS,
              steps: int = 15) -> dict:
    """Measure the atlas on ``n`` trials and write atlas.json / atlas.md / atlas.png into ``out``."""
    world = _World(Path(model_dir))
    bank = world.banks["foreground_means"]
    sites = [s for s in SITE_KEYS if s in bank.meta.sites]
    trials = []
    for i in tqdm(range(n), desc="atlas originals"):
        seed = ATLAS_SEED0 + i
        config, original = world.original(seed, steps)
        if has_object(original.mask):
            target = shift_target(original.mask)
            trials.append((config, target, _distance(original.mask, target)))
    closed = {m: np.zeros((len(sites), len(windows))) for m in ("steer", "random-control")}
    cells = [(m, si, wi) for m in closed for si in range(len(sites)) for wi in range(len(windows))]
    for method, si, wi in tqdm(cells, desc="atlas cells"):
        shares = []
        for config, target, before in trials:
            editor = make_editor(method, world.banks, target, [sites[si]], range(*windows[wi]), 1.0, config.seed)
            image = _final(guided_sample(world.model, config, [editor]))
            result = world.labeler(np.asarray(image))["mask"][0]
            shares.append(closed_share(before, _distance(result, target)))
        closed[method][si, wi] = float(np.mean(shares)) if shares else float("nan")
    metrics_path = bundle.probes_dir(model_dir) / bundle.METRICS_FILE
    probe = json.loads(metrics_path.read_text())["tasks"]["foreground"]["probe"]
    dice = np.array([[float(np.mean(probe[s][a:b])) for a, b in windows] for s in sites])
    result = {
        "n_trials": len(trials), "seed0": ATLAS_SEED0, "shift_share": SHIFT_SHARE, "method": "steer",
        "control": "random-control", "sites": sites, "windows": [list(w) for w in windows],
        "decodability_dice": dice.tolist(), "closed_share": closed["steer"].tolist(),
        "closed_share_control": closed["random-control"].tolist(),
        "rank_correlation": rank_correlation(dice, closed["steer"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "atlas.json").write_text(json.dumps(result, indent=1))
    (out / "atlas.md").write_text(render_atlas(result))
    save_figure(atlas_figure(result, [short_site_name(x) for x in sites], [_window_name(w) for w in windows]),
                out / "atlas.png", dpi=100)
    return result


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation of two maps' cells (None when either is constant)."""
    from scipy.stats import spearmanr

    x, y = np.ravel(a), np.ravel(b)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def _window_name(w: Sequence[int]) -> str:
    return f"steps {w[0] + 1}-{w[1]}"


def render_atlas(r: dict) -> str:
    """atlas.md from atlas.json (nothing typed by hand)."""
    names = [_window_name(w) for w in r["windows"]]
    header = ["site"] + [f"Dice, {n}" for n in names] + [f"moved, {n}" for n in names] + [f"control, {n}" for n in names]
    rows = [[f"`{short_site_name(s)}`"] + [f"{v:.3f}" for v in r["decodability_dice"][i]]
            + [f"{v:+.2f}" for v in r["closed_share"][i]] + [f"{v:+.2f}" for v in r["closed_share_control"][i]]
            for i, s in enumerate(r["sites"])]
    control = np.asarray(r["closed_share_control"])
    edit = np.asarray(r["closed_share"])
    best = np.unravel_index(np.nanargmax(edit), edit.shape)
    rc = r["rank_correlation"]
    return "\n".join([
        "# Decodability versus causality", "",
        "Generated by `ldm-scene toy atlas` from `atlas.json`; do not edit by hand.", "",
        f"Per site and window of steps: the foreground probe's test Dice (from the probes' metrics.json) and the share of"
        f" the distance to a target that an edit at that site and window alone closes ({r['n_trials']} trials from seed"
        f" {r['seed0']:,}; each object's mask shifted by {r['shift_share']:.0%} of the width toward the far side;"
        f" edit: `{r['method']}` at its default gain; control: `{r['control']}`, the same edit along a random direction"
        " of the same norm). 0 means the object did not move closer; 1 means it reached the target.", "",
        f"Strongest single-site edit: `{short_site_name(r['sites'][best[0]])}` in {names[best[1]]}, closing"
        f" {edit[best]:+.2f} (its control {control[best]:+.2f}); the control's largest cell {np.nanmax(control):+.2f}."
        f" Rank correlation between the two maps over all cells: {'n/a' if rc is None else f'{rc:+.2f}'}.", "",
        *markdown_table(header, rows), "", "![atlas](atlas.png)", "",
    ])
